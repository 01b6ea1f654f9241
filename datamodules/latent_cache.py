"""`python -m datamodules.latent_cache`: alias of `uniportrait-latent-cache` (src/cli/latent_cache.py)."""
from src.cli.latent_cache import console

if __name__ == "__main__":
    console()
