"""FID through torchmetrics, offline.

torchmetrics' default FID network is torch-fidelity's TF-ported Inception v3, whose weights
(`weights-inception-2015-12-05-6726825d.pth`) torch-fidelity downloads at run time unless a local
file is given. Offline, `fid_metric` therefore needs either that file (`weights`, with torch-fidelity
installed) or a custom feature `nn.Module` (torchmetrics' `feature=nn.Module`).

torch-fidelity is not a dependency of this project. `TorchvisionInceptionFeatures` is an offline
alternative built on torchvision's ImageNet Inception v3 (a local `inception_v3_google-*.pth`): its
FIDs are internally consistent but NOT comparable with published FIDs (a different Inception).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

FID_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_FEATURE_DIMS = (64, 192, 768, 2048)


class TorchvisionInceptionFeatures(nn.Module):
    """torchvision Inception v3 pool features (B, 2048) from a local ImageNet weights file.

    Input: (B, 3, H, W) images in [-1, 1] (the project convention), resized to 299 x 299 bilinear.
    torchvision's Google weights expect exactly that range (they are used with transform_input=True,
    which maps ImageNet-normalised pixels back to [-1, 1]), so no normalisation is applied here. The
    classifier (`fc`) is replaced by identity; the auxiliary head is dropped. Always in eval mode.
    """

    num_features = 2048

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        net.load_state_dict(load_inception_state(weights, net.state_dict().keys()))
        net.fc = nn.Identity()
        net.aux_logits, net.AuxLogits = False, None
        self.net = net.eval()

    def train(self, mode: bool = True) -> TorchvisionInceptionFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
        return self.net(x)  # (B, 2048)


def load_inception_state(path: str | Path, expected: Iterable[str]) -> dict[str, Tensor]:
    """torchvision Inception v3 state dict from a local .pth (weights_only) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception v3 weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: not torchvision Inception v3 weights; missing keys {missing[:5]} ({len(missing)})")
    return dict(state)


def torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def fid_metric(
    feature_extractor: nn.Module | int = 2048,
    weights: str | Path | None = None,
    input_img_size: tuple[int, int, int] = (3, 299, 299),
    **kwargs,
) -> FrechetInceptionDistance:
    """A torchmetrics FrechetInceptionDistance that never downloads.

    feature_extractor:
        int (64, 192, 768 or 2048): torch-fidelity's FID Inception layer; needs torch-fidelity and
            `weights`, the local path of its Inception file (FID_INCEPTION_FILE). update() then takes
            uint8 (B, 3, H, W) images (torchmetrics' `normalize=False`).
        nn.Module: custom features, mapping the images given to update() as they are to (B, d);
            d is read from a `num_features` attribute or probed with one image of `input_img_size`
            (float in [0, 1]). `weights` must be None (load the module's weights yourself).
    kwargs go to FrechetInceptionDistance (e.g. reset_real_features).
    """
    if isinstance(feature_extractor, nn.Module):
        if weights is not None:
            raise ValueError(f"weights={weights!r} applies to the Inception network only, not to a custom module")
        return FrechetInceptionDistance(
            feature=feature_extractor.eval(), normalize=True, input_img_size=input_img_size, **kwargs
        )
    if feature_extractor not in FID_FEATURE_DIMS:
        raise ValueError(f"feature_extractor must be an nn.Module or one of {FID_FEATURE_DIMS}, "
                         f"got {feature_extractor!r}")
    if not torch_fidelity_available():
        raise ModuleNotFoundError(
            "FID with the Inception network needs torch-fidelity, which is not installed; install it "
            f"(`pip install torch-fidelity`) and pass its local {FID_INCEPTION_FILE}, or pass a feature nn.Module"
        )
    if weights is None:
        raise ValueError(
            f"FID Inception weights are downloaded at run time unless given: pass weights=<local {FID_INCEPTION_FILE}>"
        )
    if not Path(weights).is_file():
        raise FileNotFoundError(f"FID Inception weights file not found: {weights}")
    return FrechetInceptionDistance(
        feature=feature_extractor, feature_extractor_weights_path=str(weights), input_img_size=input_img_size, **kwargs
    )
