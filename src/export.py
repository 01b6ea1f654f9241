"""`python -m src.export`: alias of `uniportrait-export` (src/cli/export.py)."""
from src.cli.export import console

if __name__ == "__main__":
    console()
