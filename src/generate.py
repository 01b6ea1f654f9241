"""`python -m src.generate`: alias of `uniportrait-generate` (src/cli/generate.py)."""
from src.cli.generate import console

if __name__ == "__main__":
    console()
