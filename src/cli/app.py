"""Serve the web demo: a gradio page generating one or several people from uploaded photos.

Examples:
  # the embedded default (after `make demo`): the tiny world under artifacts/tiny, newest runs/tiny checkpoint
  python -m src.app                       # then open http://127.0.0.1:7860
  # released UniPortrait weights on a local SD1.5 (the same weight options as `python -m src.generate`)
  python -m src.app --components configs/stage1.yaml --released-faceid uniportrait-faceid_sd15.bin \\
      --released-router uniportrait-router_sd15.bin --fp16

The model loads once, before the page is served; requests queue one at a time. Nothing is fetched from the
network (no analytics, no share link).
"""
from __future__ import annotations

import argparse
import sys

from src.cli import exit_status, run_or_exit
from src.cli.weights import add_weight_options, load_weights


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--uploads", choices=("photos", "crops"), default=None,
                   help="what uploads are by default (changeable in the page): photos (the largest face is found) "
                        "or aligned face crops; default crops on a synthetic world, photos otherwise")
    add_weight_options(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    loaded = run_or_exit(load_weights, args)
    from src.web.ui import serve  # gradio is imported only once the weights loaded

    serve(loaded, args.device, host=args.host, port=args.port, upload_kind=args.uploads)


def console() -> None:
    """Console script `uniportrait-app`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
