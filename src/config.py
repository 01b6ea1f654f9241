"""Training configs: one YAML per stage, holding only what differs from the config it builds on.

Three rules turn a config file into the plain config LightningCLI validates against the typed
signatures (`resolve_config`):

1. `inherits: PATH` (relative to the file) names the config this one builds on; the chain is merged
   with OmegaConf: mappings merge key by key, lists and scalars are replaced; a `class_path` that changes
   starts from no `init_args` (those of the parent's class are dropped).
2. `trainer.callbacks` may be a mapping of names to callbacks (`checkpoint: {class_path: ...}`), so a
   stage config adds one callback, changes one argument of another (`checkpoint: {init_args: {...}}`)
   or drops one (`identity_probe: null`) without repeating the list. After the merge the mapping
   becomes the list Lightning expects, in the order the names first appear along the chain.
3. `${a.b.c}` interpolations (OmegaConf) are resolved after the merge, against the merged config:
   `total_steps: ${trainer.max_steps}` takes the stage's own `max_steps`. They are resolved in the
   files, before command-line overrides: `--trainer.max_steps 200` cuts a run short and leaves a
   schedule of the config's length (what CI's shortened demo relies on).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

INHERITS = "inherits"


def _load(path: Path, seen: tuple[Path, ...]) -> tuple[Any, list[Path]]:
    """The merged (unresolved) OmegaConf config of `path` and its `inherits:` chain, base first."""
    if path in seen:
        raise ValueError(f"config inheritance cycle: {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must be a mapping at top level")
    parent = cfg.pop(INHERITS, None)
    if parent is None:
        return OmegaConf.create(cfg), [path]
    base, chain = _load((path.parent / parent).resolve(), seen + (path,))
    _replace_changed_classes(base, cfg)
    try:
        return OmegaConf.merge(base, OmegaConf.create(cfg)), chain + [path]
    except (OmegaConfBaseException, TypeError) as e:  # e.g. a callbacks list merged onto named callbacks
        key = getattr(e, "full_key", None) or "?"
        raise ValueError(f"config {path} does not merge onto {chain[-1]} (key {key}): {e} (a list replaces a "
                         "list, a mapping merges into a mapping)") from e


def _replace_changed_classes(base: Any, child: dict) -> None:
    """Where `child` names another `class_path` than `base` at the same key, drop `base`'s `init_args` there
    (in place): the arguments of one class are not the arguments of another (AdamW's `fused` and
    `weight_decay` would reach an Adam, or be refused by an RAdam)."""
    for key, value in child.items():
        if not isinstance(value, dict) or key not in base or not OmegaConf.is_dict(base[key]):
            continue
        old = base[key]
        if "class_path" in value and "class_path" in old and value["class_path"] != old["class_path"] \
                and "init_args" in old:
            del old["init_args"]
        _replace_changed_classes(old, value)


def callbacks_list(callbacks: Any, where: Path) -> list[dict[str, Any]]:
    """`trainer.callbacks` as Lightning's list: a mapping's entries in order, those set to null dropped."""
    if not isinstance(callbacks, dict):
        return callbacks
    out = []
    for name, spec in callbacks.items():
        if spec is None:
            continue
        if not isinstance(spec, dict) or "class_path" not in spec:
            raise ValueError(f"config {where}: trainer.callbacks.{name} must be a mapping with a class_path "
                             f"(or null to drop it), got {spec!r}")
        out.append(spec)
    return out


def resolve_config(path: str | Path) -> dict[str, Any]:
    """Load a YAML config as LightningCLI reads it: `inherits:` chain merged, interpolations resolved,
    named callbacks turned into a list. Errors name the file and the key at fault."""
    path = Path(path).resolve()
    merged, _ = _load(path, ())
    try:
        cfg = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise ValueError(f"config {path}: cannot resolve {e.full_key or '?'}: {e.msg}") from e
    assert isinstance(cfg, dict)
    trainer = cfg.get("trainer")
    if isinstance(trainer, dict) and "callbacks" in trainer:
        trainer["callbacks"] = callbacks_list(trainer["callbacks"], path)
    return cfg


def expand_config_args(args: list[str], tmpdir: str) -> list[str]:
    """Replace each `--config FILE` (or `-c FILE`) by its resolved config (`resolve_config`), written to `tmpdir`."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        value = None
        if a in ("--config", "-c") and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif a.startswith(("--config=", "-c=")):
            value, i = a.split("=", 1)[1], i + 1
        else:
            out.append(a)
            i += 1
            continue
        if Path(value).is_file() and isinstance(yaml.safe_load(Path(value).read_text()), dict):
            resolved = Path(tmpdir) / f"resolved_{len(out)}_{Path(value).name}"
            resolved.write_text(yaml.safe_dump(resolve_config(value), sort_keys=False))
            value = str(resolved)
        out += ["--config", value]
    return out
