"""The tree's rules (docs/contributing.md): entry points apart from the library, no import cycles, small files,
console scripts that exist."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("src", "datamodules", "callbacks")
MAX_LINES = 500
# `python -m` names kept for the commands of src/cli/ (each file: a docstring, one import, the __main__ block).
ALIASES = {
    "src.train": "src.cli.train", "src.generate": "src.cli.generate", "src.evaluate": "src.cli.evaluate",
    "src.export": "src.cli.export", "src.guard": "src.cli.guard", "src.bench": "src.cli.bench",
    "src.bench_sd15": "src.cli.bench_sd15", "src.tiny.__main__": "src.cli.tiny",
    "datamodules.prepare.__main__": "src.cli.prepare", "datamodules.synthetic.__main__": "src.cli.synthetic",
    "datamodules.latent_cache": "src.cli.latent_cache", "src.app": "src.cli.app",
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """First-party modules `name` imports anywhere in its file (a `from pkg import mod` counts as pkg.mod)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(name, path) - {name} for name, path in MODULES.items()}


def _is_cli(name: str) -> bool:
    return name == "src.cli" or name.startswith("src.cli.")


def test_no_library_module_imports_an_entry_point():
    offenders = {name: sorted(m for m in deps if _is_cli(m)) for name, deps in GRAPH.items()
                 if not _is_cli(name) and name not in ALIASES}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_model_package_and_the_data_package_stay_apart():
    """src/models is pure networks (no Lightning, data or callbacks); datamodules never import src/models."""
    for name, path in MODULES.items():
        if name.startswith("src.models"):
            outside = {d for d in GRAPH[name] if not d.startswith("src.models")} - {"src", "src.conventions"}
            assert not outside, f"{name} imports {sorted(outside)}"
            assert "lightning" not in _third_party(path), f"{name} imports lightning"
        if name.startswith("datamodules"):
            assert not {d for d in GRAPH[name] if d.startswith("src.models")}, f"{name} imports src.models"


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return {m.split(".")[0] for m in names}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_python_m_aliases_only_run_their_command(alias):
    """`python -m src.train` and the others: a docstring, `from src.cli.X import console`, the __main__ block."""
    tree = ast.parse(MODULES[alias].read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(body) == 2, f"{alias}: an alias holds one import and the __main__ block, nothing else"
    imp, main = body
    assert isinstance(imp, ast.ImportFrom) and imp.module == ALIASES[alias] and [a.name for a in imp.names] == [
        "console"]
    assert isinstance(main, ast.If) and ast.unparse(main.test) == "__name__ == '__main__'"


def test_no_import_cycles():
    """Depth-first search over every first-party import (function-level ones included)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                # a package importing its own submodules (its public names) is not a cycle of concepts
                if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(cycle, cycle[1:])):
                    pytest.fail("import cycle: " + " -> ".join(cycle))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_no_file_over_the_size_limit():
    big = {str(p.relative_to(REPO)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these along their concepts (at most {MAX_LINES} lines): {big}"


def test_every_console_script_names_a_command_of_src_cli():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts
    for command, target in scripts.items():
        module, _, func = target.partition(":")
        assert _is_cli(module), f"{command}: {target} is not in src/cli/"
        assert callable(getattr(importlib.import_module(module), func)), f"{command}: {target}"
    assert set(ALIASES.values()) <= {t.partition(":")[0] for t in scripts.values()}
