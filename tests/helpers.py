"""Helpers shared by tests (importable as tests.helpers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# a smaller model than the tiny configs' (one Q-Former layer, LoRA rank 4) for tests that only need it to run
SMALL_MODEL = ["--model.qformer.depth=1", "--model.lora_rank=4"]


def tiny_args(world: Path, multi: bool = False) -> list[str]:
    """CLI overrides pointing configs/tiny/*.yaml at a tiny world and shrinking the run, on one torch thread: the
    tiny configs ask for two (`torch_threads: 2`), which would override OMP_NUM_THREADS=1 in the CLI subprocesses
    (a DDP test's two ranks would then run four threads on two cores) and oversubscribe CI's parallel jobs."""
    d = world / "data"
    single = "single/train-{000000..000003}.tar"
    train = "multi/train-{000000..000003}.tar" if multi else single
    val = "heldout/multi_seen-000000.tar" if multi else "heldout/single_seen-000000.tar"
    return [
        f"--model.components.base_model={world / 'base'}",
        f"--model.components.clip_checkpoint={world / 'clip.safetensors'}",
        f"--model.components.face_backbone={world / 'face_backbone.safetensors'}",
        f"--data.train_shards={d / train}",
        f"--data.val_shards={d / val}",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--data.shuffle_buffer=16",
        "--data.epoch_length=4",
        "--trainer.enable_progress_bar=false",
        "--torch_threads=1",
    ]


def write_components_yaml(components, path: Path) -> Path:
    """A `--components` file ({model: {components: ...}}, what a user writes for real weights) for a
    ComponentPaths; returns `path`."""
    import yaml

    comps = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(components).items()}
    path.write_text(yaml.safe_dump({"model": {"components": comps}}))
    return path


class StubRecognizer:
    """Test double: image i (every pixel == i) 'contains' the faces outputs[i] (K, D), largest first."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        self.outputs = outputs

    def embed_faces(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.outputs[int(image[0, 0, 0])]
        return emb, torch.zeros(len(emb), 4)

    def embed_reference(self, image: np.ndarray) -> torch.Tensor | None:
        emb, _ = self.embed_faces(image)
        return emb[0] if len(emb) else None
