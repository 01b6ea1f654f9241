"""The gradio page of the web demo: single person (several references, interpolation with a second person) and
several people (up to 4), the generation settings, the generated images and the routing maps as coloured overlays,
and a preview of the face found in every upload. The callbacks only translate between widgets and `Demo`
(src/web/handlers.py).

Offline by construction: analytics off (set before gradio is imported), no share link, no server-side rendering
(no node process), the theme's fonts served by the app itself; requests queue one at a time (one model in memory).
"""
from __future__ import annotations

import html
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no usage reports, no version check

import gradio as gr  # noqa: E402

from src.inference.loading import LoadedPipeline  # noqa: E402
from src.inference.pipeline import SCHEDULERS  # noqa: E402
from src.web import examples as ex  # noqa: E402
from src.web.handlers import CROPS, MAX_IMAGES, MAX_PEOPLE, PHOTOS, Demo, Result, Settings  # noqa: E402

log = logging.getLogger(__name__)

QUEUE = "model"  # every event that touches the model shares one queue slot (concurrency 1)
THEME = gr.themes.Default(primary_hue="indigo", secondary_hue="slate", radius_size="md")  # local fonts only
CSS = """
#status {min-height: 2.2em; padding: 0.4em 0.8em; border-radius: 8px; background: var(--block-background-fill);}
#legend .swatch {display: inline-block; width: 0.9em; height: 0.9em; border-radius: 2px; margin: 0 0.3em 0 0.9em;
                 vertical-align: -0.1em;}
#routing img {image-rendering: pixelated;}
footer {display: none !important;}
"""
UPLOAD_KINDS = [("photos: find the largest face", PHOTOS), ("aligned face crops (as generate --face-crop)", CROPS)]


def describe(loaded: LoadedPipeline, device: str) -> str:
    """One line naming the weights the page runs on."""
    weights = f"checkpoint `{loaded.checkpoint}`" if loaded.checkpoint is not None else "the released weights"
    return f"Base model `{loaded.components.base_model}` with {weights}, on `{device}`."


def legend_html(legend: list[tuple[str, str]]) -> str:
    """Coloured squares naming each person's colour in the routing overlays."""
    if not legend:
        return ""
    swatches = "".join(f'<span class="swatch" style="background:{c}"></span>{html.escape(name)}'
                       for name, c in legend)
    return f"<div>Routing colours:{swatches}</div>"


def _outputs(result: Result) -> tuple[list, list, str, str]:
    return result.images, result.routing, legend_html(result.legend), result.message


def preview_gallery(label: str, elem_id: str) -> gr.Gallery:
    """A small gallery of the faces found in the uploads."""
    return gr.Gallery(label=label, columns=4, height=170, elem_id=elem_id, format="png", object_fit="contain")


def build(demo: Demo, subtitle: str, example_crops: list[Path] | None = None) -> gr.Blocks:
    """The page over `demo`; `example_crops` (the tiny world's held-out identities) fill the examples."""
    with gr.Blocks(title="UniPortrait", analytics_enabled=False) as page:
        gr.Markdown(f"## UniPortrait: identity-preserving portraits of one or several people\n{subtitle}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=380):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    value=ex.prompt_for(2, 1) if example_crops else "")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                with gr.Tabs():
                    with gr.Tab("Single person", elem_id="tab-single"):
                        refs = gr.File(label="Photos of the person (several references welcome)",
                                       file_count="multiple", elem_id="single-files")
                        refs_preview = preview_gallery("Faces found", "single-preview")
                        with gr.Accordion("Interpolate with a second person", open=False):
                            partner = gr.File(label="Photos of the second person", file_count="multiple",
                                              elem_id="partner-files")
                            partner_preview = preview_gallery("Faces found", "partner-preview")
                            weight = gr.Slider(0, 1, value=0.5, step=0.05, label="Weight of the second person",
                                               elem_id="partner-weight")
                        single_go = gr.Button("Generate", variant="primary", elem_id="single-generate")
                        if example_crops:
                            rows, labels = ex.single_examples(example_crops)
                            gr.Examples(rows, [refs, partner, weight, prompt], example_labels=labels,
                                        label="Examples: held-out identities of the tiny world")
                    with gr.Tab("Several people", elem_id="tab-several"):
                        people = gr.File(label=f"One photo per person, in order (up to {MAX_PEOPLE})",
                                         file_count="multiple", elem_id="several-files")
                        people_preview = preview_gallery("Faces found (person 1 first)", "several-preview")
                        several_go = gr.Button("Generate", variant="primary", elem_id="several-generate")
                        if example_crops:
                            rows, labels = ex.several_examples(example_crops)
                            gr.Examples(rows, [people, prompt], example_labels=labels,
                                        label="Examples: held-out identities of the tiny world")
                with gr.Accordion("Settings", open=True):
                    kind = gr.Radio(UPLOAD_KINDS, value=demo.upload_kind, label="Uploads are", elem_id="upload-kind")
                    with gr.Row():
                        face_scale = gr.Slider(0, 1.5, value=0.7, step=0.05, label="Face scale")
                        structure = gr.Slider(0, 1, value=0.3, step=0.05, label="Structure scale (β)")
                        auto = gr.Checkbox(value=True, label="auto β (0.1 one person, 0.3 several)")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="steps")
                        guidance = gr.Slider(1, 15, value=7.5, step=0.5, label="Guidance")
                        scheduler = gr.Dropdown(sorted(SCHEDULERS), value="ddim", label="Scheduler")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                        num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images")
            with gr.Column(scale=6, min_width=380):
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="Generated images", columns=2, height=420, elem_id="gallery",
                                     format="png", object_fit="contain")
                legend = gr.HTML(elem_id="legend")
                routing = gr.Gallery(label="Routing maps at the last step (one colour per person)", columns=4,
                                     height=320, elem_id="routing", format="png", object_fit="contain")
        settings_in = [prompt, negative, face_scale, auto, structure, steps, guidance, scheduler, seed, num_images]
        shown = [gallery, routing, legend, status]

        def settings(prompt: str, negative: str, face_scale: float, auto: bool, structure: float, steps: float,
                     guidance: float, scheduler: str, seed: float | None, num_images: float) -> Settings:
            return Settings(prompt, negative or "", face_scale, None if auto else structure, int(steps), guidance,
                            scheduler, int(seed or 0), int(num_images))

        def run_single(files: Any, partner_files: Any, w: float, kind: str, *values: Any,
                       progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:  # noqa: B008 - gradio's API
            return _outputs(demo.single(files, partner_files, w, kind, settings(*values), progress=True))

        def run_several(files: Any, kind: str, *values: Any,
                        progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:  # noqa: B008 - gradio's API
            return _outputs(demo.several(files, kind, settings(*values), progress=True))

        def previews(single_files: Any, partner_files: Any, several_files: Any, kind: str) -> tuple:
            (a, ma), (b, mb) = demo.preview(single_files, kind, "person"), demo.preview(partner_files, kind,
                                                                                        "second person")
            c, mc = demo.preview(several_files, kind, "several people")
            return a, b, c, "\n\n".join(m for m in (ma, mb, mc) if m)

        common = dict(concurrency_limit=1, concurrency_id=QUEUE)
        single_go.click(run_single, [refs, partner, weight, kind, *settings_in], shown, api_name="single", **common)
        several_go.click(run_several, [people, kind, *settings_in], shown, api_name="several", **common)
        preview_out = [refs_preview, partner_preview, people_preview, status]
        for trigger in (refs, partner, people, kind):
            trigger.change(previews, [refs, partner, people, kind], preview_out, api_visibility="private",
                           show_progress="minimal", **common)
    return page


def serve(loaded: LoadedPipeline, device: str, host: str = "127.0.0.1", port: int = 7860,
          upload_kind: str | None = None, block: bool = True) -> gr.Blocks:
    """Build the page over the loaded pipeline and serve it at http://host:port (no share link). On a
    synthetic world the held-out identities are the examples and uploads default to aligned crops;
    elsewhere uploads default to photos. `block=False` returns once the server runs (tests)."""
    manifest = ex.world_manifest(loaded.components.base_model)
    crops = None
    if manifest is not None:
        crops = ex.held_out_crops(manifest, Path(tempfile.mkdtemp(prefix="uniportrait-examples-")))
    demo = Demo(loaded, upload_kind or (CROPS if manifest is not None else PHOTOS))
    page = build(demo, describe(loaded, device), crops)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, share=False, ssr_mode=False, pwa=False, mcp_server=False,
                prevent_thread_lock=not block, theme=THEME, css=CSS, footer_links=[],
                allowed_paths=[str(crops[0].parent)] if crops else None, quiet=False)
    return page
