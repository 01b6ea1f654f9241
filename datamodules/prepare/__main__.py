"""`python -m datamodules.prepare`: alias of `uniportrait-prepare` (src/cli/prepare.py)."""
from src.cli.prepare import console

if __name__ == "__main__":
    console()
