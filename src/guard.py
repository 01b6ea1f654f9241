"""`python -m src.guard`: alias of `uniportrait-guard` (src/cli/guard.py)."""
from src.cli.guard import console

if __name__ == "__main__":
    console()
