"""`python -m src.bench`: alias of `uniportrait-bench` (src/cli/bench.py)."""
from src.cli.bench import console

if __name__ == "__main__":
    console()
