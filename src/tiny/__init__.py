"""The embedded default: a miniature, offline SD1.5 world written to disk in the real formats.

`python -m src.tiny --out artifacts/tiny` (`uniportrait-tiny`, src/cli/tiny.py) makes, deterministically from a seed:
  data/            synthetic identity shards (datamodules.synthetic), single- and multi-face
  base/            a diffusers model directory: tiny UNet, VAE, CLIP text encoder, tokenizer
                   (SD1.5's BPE, from open_clip's bundled vocabulary), SD1.5's DDPM scheduler
  clip.safetensors a tiny OpenCLIP model in open_clip's checkpoint format
  face_backbone.safetensors  a tiny IR-18 in the TFace layout
  examples/        aligned face crops of two held-out identities (for `python -m src.generate`)
Like the real parts they stand in for, the VAE, the UNet and the face backbone are *pretrained*
(briefly, on the synthetic images: reconstruction, text-conditional denoising, margin-based
identity classification) before UniPortrait training freezes them. Each step is skipped when its
output exists (delete the folder to rebuild).

Pretraining those three parts takes ~13 min on a 2-core CPU, so the default world's pretrained weights
ship in the repository (assets/tiny: the UNet and VAE directories, the face backbone, and manifest.json
with the options they were made with, their sha256 and how they were made). A build whose options are
the manifest's copies them instead of pretraining (the same bytes `--pretrain` gives on the machine the
manifest names); any other build (another seed, data size or step count) pretrains here and logs why.
`make tiny-assets` remakes them: `--pretrain --save-assets assets/tiny` on a fresh folder.

Modules: `architectures` (the tiny networks and the ComponentPaths pointing at a built world), `pretrain`
and `face_pretrain` (their pretraining), `assets` (the shipped weights), `world` (building and measuring).
"""
from src.tiny.architectures import build_tiny_clip, tiny_components
from src.tiny.world import build, measure_quality

__all__ = ["build", "build_tiny_clip", "measure_quality", "tiny_components"]
