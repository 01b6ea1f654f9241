"""Shared fixtures: a miniature world (synthetic shards + tiny pretrained components) built by the same code
as `make tiny`, with very few pretraining steps, once per version of the code, kept in pytest's cache
folder (`make test` and `make test-slow` build it once between them)."""
from __future__ import annotations

import fcntl
import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# The fixture world's options (a few hundred samples, 2 pretraining steps per part: seconds, not minutes).
WORLD_DATA = dict(identities=16, unseen=4, single=128, multi=128, heldout=32, samples_per_shard=32, seed=0,
                  progress=False)
WORLD_BUILD = dict(seed=0, vae_steps=2, unet_steps=2, face_steps=2, pretrain_images=64)

# One intra-op thread: the test processes (and DataLoader workers) share 2 cores; oversubscribed
# OpenMP threads made tiny forward passes 100x slower here.
torch.set_num_threads(1)


def build_world(root: Path) -> Path:
    from datamodules.synthetic.dataset import SyntheticConfig
    from src.tiny import build

    with torch.random.fork_rng():
        build(root, data=SyntheticConfig(**WORLD_DATA), **WORLD_BUILD)
    return root


def world_key() -> str:
    """Names the world by everything it is made from: the library code, the shipped tiny assets' manifest,
    the options above and the torch version (a change to any of them builds a new world)."""
    h = hashlib.sha256(repr((WORLD_DATA, WORLD_BUILD, torch.__version__)).encode())
    files = [REPO / "assets" / "tiny" / "manifest.json"]
    files += sorted(f for d in ("src", "datamodules", "callbacks") for f in (REPO / d).rglob("*.py"))
    for f in files:
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (pytest runs side by side build the world once; the others wait)."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_world(request, tmp_path_factory) -> Path:
    """The world's root folder; tests read it and never write into it."""
    cache = getattr(request.config, "cache", None)
    if cache is None:  # pytest -p no:cacheprovider: a world of this run's own
        return build_world(tmp_path_factory.mktemp("tiny_world"))
    store = Path(cache.mkdir("tiny_world"))
    world = store / world_key()
    done = world / ".complete"  # written last: a build that was killed leaves none, and is built again
    with locked(store / ".lock"):
        if not done.is_file():
            for old in store.iterdir():  # worlds of other code versions, and builds that were interrupted
                if old.is_dir():
                    shutil.rmtree(old)
            build_world(world)  # in place: the world's manifest names its shards by their full path
            done.write_text(world.name)
    return world


@pytest.fixture(autouse=True, scope="session")
def _tokenizers_loaded_once() -> Iterator[None]:
    """`CLIPTokenizer.from_pretrained` loads each tokenizer folder once per pytest run, keyed by the folder's files
    (name, size, modification time) and the call's arguments: parsing the 49408-token vocabulary takes ~0.3 s a
    load here, and the suite loads ~170. Tests read tokenizers and never change one, so sharing the
    loaded object is safe; a folder written anew (another test's) is a new key, and a failed load is not kept."""
    from transformers import CLIPTokenizer

    load = CLIPTokenizer.from_pretrained.__func__  # the classmethod's function
    loaded: dict[tuple, CLIPTokenizer] = {}

    def once(cls, path, *args, **kwargs):
        folder = Path(path) / kwargs.get("subfolder", "")
        try:
            files = tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in folder.iterdir() for st in [f.stat()]))
            key = (cls, str(folder.resolve()), files, args, tuple(sorted(kwargs.items())))
            hash(key)
        except (OSError, TypeError):  # not a local folder, or an argument that cannot be a key: load it
            return load(cls, path, *args, **kwargs)
        if key not in loaded:
            loaded[key] = load(cls, path, *args, **kwargs)
        return loaded[key]

    patch = pytest.MonkeyPatch()
    patch.setattr(CLIPTokenizer, "from_pretrained", classmethod(once))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _hermetic_cwd(tmp_path, monkeypatch):
    """Run every test in its own folder: configs write relative paths (runs/tiny/...), which must
    never touch the checkout's own runs or artifacts."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A config may set `torch_threads` (configs/tiny/stage1.yaml sets 2, stage2.yaml inherits it) and the
    CLI applies it to this process; put the suite's one thread back after every test, so no test inherits it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
