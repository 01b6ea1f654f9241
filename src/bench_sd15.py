"""`python -m src.bench_sd15`: alias of `uniportrait-bench-sd15` (src/cli/bench_sd15.py)."""
from src.cli.bench_sd15 import console

if __name__ == "__main__":
    console()
