"""One source per setting: every default lives once, in `conf/`.

The schemas in `mlplatform.config.schema` hold types only, and this test walks the composed
default config and the package's source to find code that holds its own default for a key
the YAML already sets: a parameter default, a `.get(key, default)`, a dataclass or pydantic
field, or a `DEFAULT_*` table. Such a copy decides the value whenever the code is reached by
a path that does not pass the config, and drifts from the YAML silently.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from omegaconf import MISSING, OmegaConf

from mlplatform.config import schema
from tests.conftest import compose

PACKAGE = Path(__file__).resolve().parents[1] / "mlplatform"
# Leaf names too generic to attribute a parameter of that name to one config key.
GENERIC = {"name", "root", "path", "mode", "enabled", "version", "split", "seed", "metric", "since",
           "until", "input", "output", "image", "window", "steps", "apply", "ref", "role", "weight",
           "device", "kinds", "strength", "host", "port", "repo", "base", "source", "action", "cache",
           "interpolation", "mean", "std", "image_size", "num_classes", "labels", "tags", "dir",
           "project", "entity", "out_dir", "versions", "shadows", "candidate", "baseline", "half",
           "compile", "fuse", "threads", "tune", "hflip", "translate", "batch_size", "top_k", "deployment",
           "capture_root", "max_bytes", "timeout_s", "num_cpus", "train", "val", "test", "salt"}
# Per-item schemas of lists: an omitted `deployment` means no overrides, an omitted secret
# source means the other one, an omitted trusted_labeller means untrusted: not default values.
ITEM_DEFAULTS = {("ServeVersionConf", "deployment"), ("ServeShadowConf", "deployment"),
                 ("ServeAuthKeyConf", "secret_env"), ("ServeAuthKeyConf", "secret_file"),
                 ("ServeAuthKeyConf", "trusted_labeller")}


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    elif not isinstance(node, list) or not any(isinstance(x, dict) for x in node):
        out[prefix] = node
    return out


def _config_keys() -> dict[str, dict[str, Any]]:
    """leaf name -> {dotted key: value} over the composed defaults of every mode that adds keys."""
    keys: dict[str, dict[str, Any]] = {}
    for overrides in ([], ["+mode=pipeline"], ["+train/tune=asha"]):
        cfg = OmegaConf.to_container(compose(*overrides), resolve=True)
        for dotted, value in _leaves(cfg).items():
            if "_target_" in dotted or dotted.startswith("hydra"):
                continue
            keys.setdefault(dotted.rsplit(".", 1)[-1], {})[dotted] = value
    return keys


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return MISSING


def _restated(tree: ast.AST, names: set[str]) -> list[tuple[int, str, Any]]:
    """(line, key, literal) for every place the source gives a config key a literal default."""
    hits: list[tuple[int, str, Any]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            for arg, default in pairs:
                value = _literal(default)
                if arg.arg in names and value is not MISSING and value is not None:
                    hits.append((node.lineno, arg.arg, value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and len(node.args) == 2:
            key, value = _literal(node.args[0]), _literal(node.args[1])
            if (node.func.attr in ("get", "pop") and isinstance(key, str) and key in names
                    and value is not MISSING and value is not None):
                hits.append((node.lineno, key, value))
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and stmt.value is not None and stmt.target.id in names):
                    value = _literal(stmt.value)
                    if value is not MISSING and value is not None:
                        hits.append((stmt.lineno, stmt.target.id, value))
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.startswith("DEFAULT")
                                                  for t in node.targets):
            table = _literal(node.value)
            if isinstance(table, dict):
                hits += [(node.lineno, k, v) for k, v in table.items() if k in names]
    return hits


def test_schemas_hold_types_not_values() -> None:
    bad = []
    for cls in vars(schema).values():
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            continue
        for f in dataclasses.fields(cls):
            nested = f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
            if (cls.__name__, f.name) in ITEM_DEFAULTS or nested:
                continue
            if f.default is not MISSING or f.default_factory is not dataclasses.MISSING:
                bad.append(f"{cls.__name__}.{f.name}")
    assert not bad, f"schema fields with a value (move it to conf/): {bad}"


def test_composed_defaults_are_complete() -> None:
    """Every key has a value in YAML (only a folder dataset's root is the user's to give)."""
    for overrides in ([], ["+mode=pipeline"], ["+experiment=smoke"], ["monitor=scipy"], ["logger=none"]):
        cfg = compose(*overrides)
        assert OmegaConf.missing_keys(cfg) == set(), overrides


def test_no_code_restates_a_config_default() -> None:
    keys = _config_keys()
    # A name that means one key only; generic names (root, path, ...) name many things.
    specific = {name for name, where in keys.items() if name not in GENERIC and len(where) == 1}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "config" and path.name == "schema.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, name, value in _restated(tree, specific):
            (dotted, yaml_value), = keys[name].items()
            found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}={value!r} "
                         f"restates {dotted} (conf/ says {yaml_value!r})")
    assert not found, "code holds its own default for a config key:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "def f(min_consecutive: int = 1): pass",
    "x = s.get('min_consecutive', 2)",
    "class A:\n    min_consecutive: int = 1",
    "DEFAULT_ALERTS = {'min_consecutive': 1}",
])
def test_the_walk_finds_each_kind_of_copy(source: str) -> None:
    assert [h[1] for h in _restated(ast.parse(source), {"min_consecutive"})] == ["min_consecutive"]
