"""`python -m src.train`: alias of `uniportrait-train` (src/cli/train.py)."""
from src.cli.train import console

if __name__ == "__main__":
    console()
