"""`python -m datamodules.synthetic`: alias of `uniportrait-synthetic` (src/cli/synthetic.py)."""
from src.cli.synthetic import console

if __name__ == "__main__":
    console()
