"""`python -m src.app`: alias of `uniportrait-app` (src/cli/app.py)."""
from src.cli.app import console

if __name__ == "__main__":
    console()
