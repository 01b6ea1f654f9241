"""The stage configs' own commands at full size on the CPU, on random weights, timed.

    make full-size                                           # SD1.5 UNet/VAE/text encoder, ViT-H/14, IR-101
    python -m src.cli.full_size --arch tiny --out /tmp/fs    # the same steps on the tiny architectures (seconds)

In the folder `OUT` (default artifacts/full-size; artifacts/full-size-tiny with --arch tiny):

1. `components/`: random-weight networks of the architecture (`src.benchmarks.sd15.SD15` or `tiny_arch()`, built
   by `build_nets`) in the on-disk formats `ComponentPaths` loads: a diffusers SD1.5 directory `base/` (unet, vae,
   text_encoder, tokenizer written offline, scheduler; save_pretrained layout), an OpenCLIP checkpoint `clip.bin`
   (the whole CLIP's state dict, as the released ViT-H/14 `open_clip_pytorch_model.bin`), a face backbone
   `face_backbone.bin` (TFace state dict, as the IR-101 Glint360K file) and `components.yaml` (the stage config's
   `model.components` pointed at them, for `--components`). Skipped when `components/.complete`, written last,
   names the same architecture.
2. `data/`: synthetic identity shards (`datamodules.synthetic`) at the UNet's native resolution (512 px at SD1.5
   size): single-face shards for stage 1, multi-face shards for stage 2.
3. `python -m src.train fit --config configs/stage1.yaml`, then `--config configs/stage2.yaml` from stage 1's
   last.ckpt, overriding only the paths, the steps, batch 1, no loader workers, fp32 on the CPU, the thread count,
   the log folder (and, with --arch tiny, the architecture), with Lightning's SimpleProfiler to time a step. They
   run inside `OUT`, so the configs' relative checkpoint folders (runs/stageN/checkpoints) land in OUT/runs.
4. `python -m src.generate` with two face photos, and `python -m src.export` (fp32, then `--dtype float16`) on the
   stage-2 checkpoint.

Each step is a process of its own (the writers run in a spawned child), so its wall time and peak RSS are its own.
The report (`OUT/report.json`, and a markdown table) has per step: wall time, peak RSS, the mean training step
(SimpleProfiler's `run_training_batch`), the trainable parameter count (the module's log line) and the sizes of the
files written.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from src.benchmarks.sd15 import SD15, Arch, build_nets, tiny_arch

REPO = Path(__file__).resolve().parents[2]
STAGE_CONFIGS = {1: REPO / "configs" / "stage1.yaml", 2: REPO / "configs" / "stage2.yaml"}
DONE = ".complete"  # written last into components/ and data/: a folder without it is (re)written
CLIP_FILE, FACE_FILE, COMPONENTS_YAML = "clip.bin", "face_backbone.bin", "components.yaml"
PROMPT = "two friends having coffee in Paris"
GB = 1024**3


def arch_named(name: str) -> Arch:
    """`sd15` (the SD1.5-scale networks) or `tiny` (the embedded default's architectures)."""
    if name == "sd15":
        return SD15
    if name == "tiny":
        return tiny_arch()
    raise ValueError(f"--arch {name!r}: expected 'sd15' or 'tiny'")


@dataclass
class Step:
    """One row of the report."""

    step: str
    wall_s: float
    peak_rss_gb: float | None = None
    command: str | None = None
    log_file: str | None = None  # the command's output, relative to OUT
    train_step_s: float | None = None
    trainable_params: int | None = None
    outputs: dict[str, int] = field(default_factory=dict)  # file (relative to OUT) -> bytes
    note: str = ""
    error: str | None = None


# ---------------------------------------------------------------------------------------------- components
def _config_components() -> dict[str, Any]:
    """`model.components` of configs/stage1.yaml (stage 2 inherits them), as training resolves it."""
    from src.config import resolve_config

    return dict(resolve_config(STAGE_CONFIGS[1])["model"]["components"])


def component_overrides(arch: Arch, folder: Path) -> dict[str, Any]:
    """What differs from the stage configs' `model.components`: the three paths; with the tiny architectures also
    their CLIP tower and face backbone shapes (the SD1.5 ones are the configs' own: ViT-H-14, IR-101)."""
    out: dict[str, Any] = {"base_model": str(folder / "base"), "clip_checkpoint": str(folder / CLIP_FILE),
                           "face_backbone": str(folder / FACE_FILE)}
    if arch.name != SD15.name:
        out.update(clip_vision_config=dict(arch.clip_vision), clip_embed_dim=arch.clip_embed_dim,
                   face_num_layers=arch.face["num_layers"], face_widths=list(arch.face["widths"]),
                   face_embedding_size=arch.face["embedding_size"])
    return out


def _open_clip_model(arch: Arch, clip_model: str):
    """A random-weight open_clip CLIP (vision and text towers) whose state dict `ComponentPaths` loads: at SD1.5
    size `open_clip.create_model(clip_model)` after checking its vision tower is the architecture's."""
    import open_clip

    if arch.name != SD15.name:
        from src.tiny.architectures import build_tiny_clip

        return build_tiny_clip(seed=0)
    cfg = open_clip.get_model_config(clip_model)
    if cfg is None:
        raise ValueError(f"{STAGE_CONFIGS[1]}: model.components.clip_model={clip_model!r} is no open_clip model")
    if cfg["vision_cfg"] != arch.clip_vision or cfg["embed_dim"] != arch.clip_embed_dim:
        raise ValueError(f"open_clip {clip_model!r} has vision_cfg={cfg['vision_cfg']}, embed_dim={cfg['embed_dim']}; "
                         f"the {arch.name} architecture has {arch.clip_vision}, {arch.clip_embed_dim}")
    return open_clip.create_model(clip_model)


def write_components(arch_name: str, folder: Path, threads: int) -> None:
    """Write the random-weight components of `arch_name` under `folder` (see the module docstring)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    arch = arch_named(arch_name)
    config = _config_components()
    if arch.name == SD15.name and arch.face["num_layers"] != config.get("face_num_layers", 100):
        raise ValueError(f"{STAGE_CONFIGS[1]}: model.components.face_num_layers={config.get('face_num_layers')}, "
                         f"the {arch.name} architecture has {arch.face['num_layers']}")
    base = folder / "base"
    nets = build_nets(arch, base / "tokenizer")
    nets.unet.save_pretrained(base / "unet")
    nets.vae.save_pretrained(base / "vae")
    nets.text_encoder.save_pretrained(base / "text_encoder")
    nets.scheduler.save_pretrained(base / "scheduler")
    torch.save(nets.face.state_dict(), folder / FACE_FILE)
    del nets  # before the whole CLIP: at SD1.5 size each is several GB
    clip = _open_clip_model(arch, config.get("clip_model", "ViT-H-14"))
    torch.save({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / CLIP_FILE)
    components = {**config, **component_overrides(arch, folder)}
    (folder / COMPONENTS_YAML).write_text(yaml.safe_dump({"model": {"components": components}}, sort_keys=False))


def native_resolution(base: Path) -> int:
    """The UNet's native image size: latent sample_size x the VAE's downsampling (what diffusers pipelines use)."""
    unet = json.loads((base / "unet" / "config.json").read_text())
    vae = json.loads((base / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def write_data(arch_name: str, folder: Path, resolution: int) -> None:
    """Four single-face and four multi-face (2-3 identities) samples at `resolution`, one shard each."""
    from datamodules.synthetic.dataset import SyntheticConfig, generate

    arch = arch_named(arch_name)
    # crops rendered from at least 256 px (the 64 px tiny images are rendered 4x larger for their crops)
    generate(folder, SyntheticConfig(size=resolution, identities=4, unseen=0, single=4, multi=4, heldout=0,
                                     samples_per_shard=4, clip_size=arch.clip_vision["image_size"],
                                     crop_scale=max(1, 256 // resolution), progress=False))


def _peak_rss_gb(maxrss: int) -> float:
    """ru_maxrss (kilobytes on Linux, bytes on macOS) in GiB."""
    return maxrss / GB if sys.platform == "darwin" else maxrss * 1024 / GB


def _measured(fn: Callable[..., None], *args: Any) -> float:
    """Run `fn(*args)` (in a child process) and return that process's peak RSS in GiB."""
    fn(*args)
    return _peak_rss_gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def in_child(fn: Callable[..., None], *args: Any) -> float:
    """`fn(*args)` in a fresh spawned process, so its memory is returned when it ends; returns its peak RSS (GiB)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measured, fn, *args).result()


def _marker_matches(folder: Path, what: dict[str, Any]) -> bool:
    """True when `folder` was completely written for `what`; a marker for something else is an error (the folder
    is never deleted here: at SD1.5 size it holds ~9 GB that took minutes to write)."""
    marker = folder / DONE
    if not marker.is_file():
        return False
    found = json.loads(marker.read_text())
    if found != what:
        raise ValueError(f"{marker} was written for {found}, not {what}: use another --out or remove {folder}")
    return True


def ensure_written(name: str, folder: Path, what: dict[str, Any], write: Callable[..., None], *args: Any) -> Step:
    """Write `folder` with `write(*args)` in a child process unless its marker says it is complete."""
    t0 = time.perf_counter()
    if _marker_matches(folder, what):
        return Step(name, time.perf_counter() - t0, note=f"kept ({folder / DONE} exists)")
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted write
    folder.mkdir(parents=True)
    peak = in_child(write, *args)
    (folder / DONE).write_text(json.dumps(what))
    return Step(name, time.perf_counter() - t0, peak_rss_gb=peak)


# ---------------------------------------------------------------------------------------------- commands
def run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[int, float, float]:
    """Run `cmd` with its output in `log`; (exit status, wall seconds, peak RSS of that process in GiB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, _peak_rss_gb(usage.ru_maxrss)


def child_env(threads: int) -> dict[str, str]:
    """The commands' environment: `threads` OpenMP threads, offline, this checkout first on the import path."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _flag(key: str, value: Any) -> str:
    return f"--{key}={json.dumps(value) if isinstance(value, (dict, list)) else value}"


def train_command(stage: int, arch: Arch, out: Path, threads: int, steps: int, resolution: int) -> list[str]:
    """`python -m src.train fit --config configs/stageN.yaml` with the overrides of the module docstring."""
    shards = out / "data" / ("multi" if stage == 2 else "single") / "train-000000.tar"
    overrides = {f"model.components.{k}": v for k, v in component_overrides(arch, out / "components").items()}
    if arch.name != SD15.name:  # the tiny architectures: their resolution, Q-Former and LoRA rank
        overrides["data.resolution"] = resolution
        overrides.update({f"model.qformer.{k}": v for k, v in arch.qformer.items()})
        overrides["model.lora_rank"] = arch.lora_rank
    overrides.update({
        "data.train_shards": shards, "trainer.max_steps": steps, "data.batch_size": 1, "data.num_workers": 0,
        "trainer.precision": "32-true", "trainer.accelerator": "cpu", "trainer.devices": 1, "torch_threads": threads,
        "trainer.logger.init_args.save_dir": out / "runs",
        "trainer.profiler": "lightning.pytorch.profilers.SimpleProfiler",
        "trainer.profiler.init_args.dirpath": out / "logs", "trainer.profiler.init_args.filename": f"stage{stage}",
    })
    if stage == 2:
        overrides["model.init_from"] = last_checkpoint(out, 1)
    return [sys.executable, "-m", "src.train", "fit", "--config", str(STAGE_CONFIGS[stage])] + [
        _flag(k, v) for k, v in overrides.items()]


def last_checkpoint(out: Path, stage: int) -> Path:
    """Where configs/stageN.yaml's checkpoint callback writes last.ckpt when run inside `out`."""
    return out / "runs" / f"stage{stage}" / "checkpoints" / "last.ckpt"


def mean_step_seconds(profiles: list[Path]) -> float | None:
    """SimpleProfiler's mean `run_training_batch` duration (seconds) from its report file(s)."""
    for profile in profiles:
        for line in profile.read_text().splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) > 2 and cells[1] == "run_training_batch":
                return float(cells[2])
    return None


def trainable_parameters(log: Path) -> int | None:
    """The total of the module's `stage N trainable parameters: ...; total 1,234` log line."""
    found = re.findall(r"trainable parameters: .*; total ([\d,]+)", log.read_text(errors="replace"))
    return int(found[-1].replace(",", "")) if found else None


def _sizes(out: Path, files: list[Path]) -> dict[str, int]:
    return {str(f.relative_to(out)): f.stat().st_size for f in files if f.is_file()}


def _tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def face_photos(folder: Path) -> list[Path]:
    """Two face photos written into `folder`: matplotlib's sample of Grace Hopper and its mirror image."""
    from matplotlib import cbook
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        photo = img.convert("RGB")
    paths = [folder / "grace_hopper.jpg", folder / "grace_hopper_mirrored.jpg"]
    photo.save(paths[0], quality=95)
    ImageOps.mirror(photo).save(paths[1], quality=95)
    return paths


# ---------------------------------------------------------------------------------------------- the run
def _load_avg() -> float | None:
    """The 1-minute load average: other processes on these cores slow every figure down."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _torch_version() -> str:
    import torch

    return torch.__version__


@dataclass
class Options:
    arch: str = "sd15"
    out: Path = Path("artifacts/full-size")
    threads: int = 2
    steps: int = 2
    infer_steps: int = 4
    faces: list[Path] = field(default_factory=list)  # empty: `face_photos`


def run(opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every step in order (the first failure stops the run); writes and returns the report."""
    arch = arch_named(opts.arch)
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    comps, logs = out / "components", out / "logs"
    env = child_env(opts.threads)
    report: dict[str, Any] = {"arch": arch.name, "threads": opts.threads, "train_steps": opts.steps,
                              "infer_steps": opts.infer_steps, "date": dt.date.today().isoformat(),
                              "torch": _torch_version(), "load_avg_1m_start": _load_avg(),
                              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": []}
    rows: list[Step] = []
    t_start = time.perf_counter()

    def add(step: Step) -> bool:
        rows.append(step)
        report["load_avg_1m_end"], report["total_s"] = _load_avg(), round(time.perf_counter() - t_start, 1)
        report["rows"] = [asdict(r) for r in rows]
        (out / "report.json").write_text(json.dumps(report, indent=2))
        status = f"failed: {step.error}" if step.error else f"{step.wall_s:.1f} s"
        log(f"[full-size] {step.step}: {status}" + (f" ({step.note})" if step.note else ""))
        return step.error is None

    def command(name: str, cmd: list[str], files: Callable[[], list[Path]] = list) -> Step:
        path = logs / f"{name.replace(' ', '_')}.log"
        log(f"[full-size] {name}: {shlex.join(cmd)}  (log: {path})")
        rc, wall, peak = run_logged(cmd, out, env, path)  # inside OUT: relative outputs stay there
        step = Step(name, wall, peak, command=shlex.join(cmd), log_file=str(path.relative_to(out)),
                    outputs=_sizes(out, files()))
        if rc != 0:
            step.error = f"exit status {rc}; last lines of {path}:\n{_tail(path)}"
        return step

    step = ensure_written("write components", comps, {"arch": arch.name}, write_components, arch.name, comps,
                          opts.threads)
    step.outputs = _sizes(out, sorted(p for p in comps.rglob("*") if p.is_file() and p.name != DONE))
    add(step)
    resolution = native_resolution(comps / "base")
    if not add(ensure_written("write shards", out / "data", {"arch": arch.name, "resolution": resolution},
                              write_data, arch.name, out / "data", resolution)):
        return report
    for stage in (1, 2):
        shutil.rmtree(out / "runs" / f"stage{stage}", ignore_errors=True)  # else the run resumes from it
        for old in logs.glob(f"fit-stage{stage}*.txt"):
            old.unlink()  # SimpleProfiler appends to its report file
        step = command(f"stage {stage}", train_command(stage, arch, out, opts.threads, opts.steps, resolution),
                       lambda stage=stage: [last_checkpoint(out, stage)])
        step.train_step_s = mean_step_seconds(sorted(logs.glob(f"fit-stage{stage}*.txt")))
        step.trainable_params = trainable_parameters(out / step.log_file) if step.log_file else None
        step.note = f"mean of {opts.steps} steps, batch 1, {resolution} px"
        if not add(step):
            return report
    ckpt, yaml_path = last_checkpoint(out, 2), comps / COMPONENTS_YAML
    faces = opts.faces or face_photos(out / "faces")
    gen = out / "generated"
    shutil.rmtree(gen, ignore_errors=True)
    cmd = [sys.executable, "-m", "src.generate", "--prompt", PROMPT, "--components", str(yaml_path),
           "--checkpoint", str(ckpt), "--steps", str(opts.infer_steps), "--out", str(gen), "--device", "cpu"]
    for face in faces:
        cmd += ["--face", str(Path(face).resolve())]
    step = command("generate", cmd, lambda: sorted(gen.glob("*.png")))
    step.note = f"{len(faces)} identities, {opts.infer_steps} steps, {resolution} px"
    if not add(step):
        return report
    for dtype in ("float32", "float16"):
        dest = out / "export" / dtype
        shutil.rmtree(dest, ignore_errors=True)
        cmd = [sys.executable, "-m", "src.export", "--checkpoint", str(ckpt), "--components", str(yaml_path),
               "--out", str(dest)] + (["--dtype", dtype] if dtype != "float32" else [])
        step = command(f"export {dtype}", cmd, lambda dest=dest: sorted(dest.glob("*")))
        if step.error and dtype != "float32" and "unrecognized arguments: --dtype" in step.error:
            step.note, step.error = "skipped: this src.export has no --dtype", None
        add(step)
    return report


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else ""


def table(report: dict[str, Any]) -> str:
    """The report's rows as a markdown table (sizes in MB = 10^6 bytes, memory in GiB)."""
    lines = ["| step | wall (s) | peak RSS (GiB) | train step (s) | trainable params | written | note |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        written = ", ".join(f"{Path(k).name} {v / 1e6:,.1f} MB" for k, v in r["outputs"].items()
                            if r["step"] != "write components")
        if r["step"] == "write components" and r["outputs"]:
            written = f"{len(r['outputs'])} files, {sum(r['outputs'].values()) / 1e9:.2f} GB"
        note = f"failed: {r['error'].splitlines()[0]}" if r.get("error") else r.get("note", "")
        lines.append(f"| {r['step']} | {r['wall_s']:.1f} | {_cell(r, 'peak_rss_gb', '.2f')} | "
                     f"{_cell(r, 'train_step_s', '.2f')} | {_cell(r, 'trainable_params', ',')} | {written} | {note} |")
    lines.append(f"\n{report['arch']} architecture, {report['threads']} threads per command, on "
                 f"{report['machine']}; load average (1 min) {report['load_avg_1m_start']} at the start, "
                 f"{report.get('load_avg_1m_end')} at the end.")
    return "\n".join(lines)
