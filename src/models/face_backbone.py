"""Face-recognition backbone: the IR family in the TFace / CurricularFace parameter layout.

The module tree reproduces TFace's ``Backbone(input_size=[112, 112], num_layers=N, mode='ir')``
name for name (``input_layer``, ``body.{i}.shortcut_layer`` / ``body.{i}.res_layer``,
``output_layer``), so the released ``glint360k_curricular_face_r101_backbone.bin`` loads with strict
key matching. Besides the 512-d embedding, ``forward`` returns the outputs of the last unit of
every stage, which UniPortrait uses as its identity features:

- ``intrinsic_tokens``: the 1/16 map (512 x 7 x 7 for IR-101) as 49 tokens = ``F_r``;
- ``structure_tokens``: the 1/2, 1/4, 1/8 maps resized bilinearly to the CLIP patch grid and
  concatenated on channels (64 + 128 + 256 = 448 for IR-101), the face half of ``F_s``.

Small ``widths`` (e.g. (16, 32, 64, 128)) give the tiny preset's backbone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

# Units per stage for each supported depth (TFace get_blocks).
STAGE_UNITS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
}
# Spatial size of the last stage's map for each supported input size (four stride-2 stages).
_FINAL_MAP = {112: 7, 224: 14}


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and stop gradients to all its parameters; returns it.

    Modules with a ``frozen`` flag (``IRBackbone``) also ignore later ``.train()`` calls from a
    parent module, so their BatchNorm statistics stay fixed while the rest of a model trains.
    """
    if hasattr(module, "frozen"):
        module.frozen = True  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for Tensor | Module only
    module.eval()
    module.requires_grad_(False)
    return module


@dataclass
class FaceFeatures:
    """Outputs of ``IRBackbone.forward``.

    embedding: (B, embedding_size) recognition embedding (not L2-normalised).
    stages:    4 stage outputs (last unit of each stage):
               (B, w0, 56, 56), (B, w1, 28, 28), (B, w2, 14, 14), (B, w3, 7, 7) at 112 px input.
    """

    embedding: torch.Tensor
    stages: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class BasicBlockIR(nn.Module):
    """TFace ``BasicBlockIR``: pre-activation residual unit; the stride sits on the second conv.

    Shortcut: ``MaxPool2d(1, stride)`` (pure subsampling) when channels match, else 1x1 conv + BN.
    """

    def __init__(self, in_channel: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False),
                nn.BatchNorm2d(depth),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, depth, H / stride, W / stride)."""
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    """IR-18/34/50/100 face-recognition backbone (TFace layout), input (B, 3, 112, 112) in [-1, 1].

    Args:
        num_layers: 18, 34, 50 or 100 (units per stage in ``STAGE_UNITS``).
        widths: channels of the four stages; the stem has ``widths[0]`` channels.
        embedding_size: size of the recognition embedding.
        input_size: 112 (the released model) or 224.
    """

    def __init__(
        self,
        num_layers: int = 100,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        embedding_size: int = 512,
        input_size: int = 112,
    ) -> None:
        super().__init__()
        if num_layers not in STAGE_UNITS:
            raise ValueError(f"num_layers={num_layers} is not supported; choose one of {sorted(STAGE_UNITS)}")
        if input_size not in _FINAL_MAP:
            raise ValueError(f"input_size={input_size} is not supported; choose one of {sorted(_FINAL_MAP)}")
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) <= 0:
            raise ValueError(f"widths must be 4 positive ints, got {widths}")
        self.num_layers = num_layers
        self.widths = widths
        self.embedding_size = embedding_size
        self.input_size = input_size
        self.frozen = False  # set by `freeze`: train() then keeps the module in eval mode
        final = _FINAL_MAP[input_size]

        self.input_layer = nn.Sequential(
            nn.Conv2d(3, widths[0], (3, 3), 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.PReLU(widths[0]),
        )
        units: list[nn.Module] = []
        self.stage_ends: list[int] = []  # body index of the last unit of each stage (2, 15, 45, 48 for IR-101)
        in_ch = widths[0]
        for depth, n in zip(widths, STAGE_UNITS[num_layers]):
            units.append(BasicBlockIR(in_ch, depth, 2))
            units.extend(BasicBlockIR(depth, depth, 1) for _ in range(n - 1))
            in_ch = depth
            self.stage_ends.append(len(units) - 1)
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(widths[3]),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(widths[3] * final * final, embedding_size),
            nn.BatchNorm1d(embedding_size, affine=False),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """TFace ``initialize_weights``: Kaiming-normal (fan_out) convs/linears, zero biases, BN = identity.

        Only matters for the tiny preset, which is pretrained here before being frozen; the real
        model's weights come from the released checkpoint.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> IRBackbone:
        """As nn.Module.train, except that a frozen backbone stays in eval mode (fixed BN statistics)."""
        return super().train(mode and not self.frozen)

    @property
    def intrinsic_dim(self) -> int:
        """Channels of the intrinsic tokens (last stage width, 512 for IR-101)."""
        return self.widths[3]

    @property
    def structure_dim(self) -> int:
        """Channels of the structure tokens (w0 + w1 + w2, 448 for IR-101)."""
        return self.widths[0] + self.widths[1] + self.widths[2]

    def intrinsic_tokens(self, feats: FaceFeatures) -> torch.Tensor:
        """Method form of the module-level ``intrinsic_tokens``: (B, 49, w3)."""
        return intrinsic_tokens(feats)  # the module-level function (methods see module globals)

    def structure_tokens(self, feats: FaceFeatures, grid: int) -> torch.Tensor:
        """Method form of the module-level ``structure_tokens``: (B, grid*grid, w0+w1+w2)."""
        return structure_tokens(feats, grid)

    def forward(self, x: torch.Tensor) -> FaceFeatures:
        """x: (B, 3, S, S) in [-1, 1], S = input_size -> FaceFeatures (embedding + 4 stage maps)."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"IRBackbone expects (B, 3, {self.input_size}, {self.input_size}) input, got {tuple(x.shape)}"
            )
        h = self.input_layer(x)  # (B, w0, S, S)
        stages: list[torch.Tensor] = []
        for i, unit in enumerate(self.body):
            h = unit(h)
            if i in self.stage_ends:
                stages.append(h)  # (B, w_k, S / 2^(k+1), S / 2^(k+1))
        emb = self.output_layer(h)  # (B, embedding_size)
        return FaceFeatures(embedding=emb, stages=tuple(stages))  # type: ignore[arg-type]


def intrinsic_tokens(feats: FaceFeatures) -> torch.Tensor:
    """Last stage map as tokens (F_r): (B, w3, 7, 7) -> (B, 49, w3), row-major over (h, w)."""
    last = feats.stages[3]
    return last.flatten(2).transpose(1, 2)  # (B, 49, w3)


def structure_tokens(feats: FaceFeatures, grid: int) -> torch.Tensor:
    """Shallow maps resized to the CLIP patch grid: -> (B, grid*grid, w0 + w1 + w2).

    The 1/2, 1/4, 1/8 maps are each resized bilinearly (align_corners=False) to grid x grid and
    concatenated on channels; tokens are row-major so they line up with CLIP's patch tokens.
    """
    maps = [
        F.interpolate(m, size=(grid, grid), mode="bilinear", align_corners=False) for m in feats.stages[:3]
    ]
    cat = torch.cat(maps, dim=1)  # (B, w0+w1+w2, grid, grid)
    return cat.flatten(2).transpose(1, 2)  # (B, grid*grid, w0+w1+w2)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat tensor state dict from .safetensors, or .bin/.pt/.pth via torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
        return obj
    raise ValueError(f"{path}: unsupported checkpoint suffix {path.suffix!r} (use .safetensors, .bin, .pt, .pth)")


def describe_key_mismatch(path: str | Path, missing: list[str], unexpected: list[str], limit: int = 8) -> str:
    """Human-readable message for a strict-load failure, listing a few missing/unexpected keys."""
    parts = [f"{path}: state dict does not match the model"]
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[:limit]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:limit]}")
    return "; ".join(parts)


def load_face_backbone(
    path: str | Path,
    num_layers: int = 100,
    widths: tuple[int, ...] = (64, 128, 256, 512),
    embedding_size: int = 512,
) -> IRBackbone:
    """Build an ``IRBackbone`` and strictly load a TFace-layout state dict; returns it frozen, in eval mode.

    Raises FileNotFoundError for a missing file and ValueError naming the file and a few
    missing/unexpected keys, or the first key with a wrong shape, on a mismatch.
    """
    state = read_state_dict(path)
    model = IRBackbone(num_layers=num_layers, widths=widths, embedding_size=embedding_size)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            describe_key_mismatch(path, missing, unexpected)
            + f" (built IR-{num_layers}, widths={tuple(widths)}, embedding_size={embedding_size})"
        )
    for k, v in own.items():
        if state[k].shape != v.shape:
            raise ValueError(
                f"{path}: key {k!r} has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)} "
                f"(built IR-{num_layers}, widths={tuple(widths)}, embedding_size={embedding_size})"
            )
    model.load_state_dict(state, strict=True)
    return freeze(model)  # type: ignore[return-value]
