"""`python -m src.tiny`: alias of `uniportrait-tiny` (src/cli/tiny.py)."""
from src.cli.tiny import console

if __name__ == "__main__":
    console()
