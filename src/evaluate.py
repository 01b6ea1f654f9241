"""`python -m src.evaluate`: alias of `uniportrait-eval` (src/cli/evaluate.py)."""
from src.cli.evaluate import console

if __name__ == "__main__":
    console()
