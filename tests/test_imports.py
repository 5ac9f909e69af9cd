"""The package's shape, read from source with `ast` (no imports, no Ray, well under a second):
no import cycles between mlplatform modules, counting the imports inside functions that
would otherwise hide one, and private Ray APIs only behind mlplatform/ray_compat.py. Two
tests import for real, in a subprocess: the ingress, and the serve launcher's resolution of
its config, load without torch."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlplatform"
ADAPTER = PACKAGE / "ray_compat.py"


def module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its body (functions included).

    Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so it counts as
    importing those packages too, except a module's own enclosing packages: they are already
    being imported when it runs. `from a.b import c` imports the module `a.b.c` when there is
    one. Imports under `if TYPE_CHECKING:` count as well: a cycle for the type checker is one
    for the reader."""
    files = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        own_package = mod if mod in packages else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the importing module's package upwards
                    base = own_package.split(".")[: len(own_package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets.add(source)
                targets.update(f"{source}.{alias.name}" for alias in node.names)
        for target in targets:
            for name in [*_ancestors(target), target]:
                if name in files and name != mod and name not in _ancestors(mod):
                    graph[mod].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [m1, m2, ..., m1], or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_no_import_cycles() -> None:
    graph = import_graph(PACKAGE)
    assert "mlplatform.deployments.ingress" in graph["mlplatform.deployments.app"]  # the graph is read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_hidden_in_a_function_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "c.py").write_text("import pkg.sub\n")  # the package, then its __init__'s import of b
    graph = import_graph(pkg)
    assert graph["pkg.c"] == {"pkg.sub"} and graph["pkg.sub"] == {"pkg.sub.b"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(pkg)) is None


# ----------------------------------------------------------------------------- private Ray APIs

# Private members Ray hands out on public objects (a Serve client, the worker's node).
PRIVATE_RAY_MEMBERS = ("global_worker", "_wait_for_application_running", "_get_global_client",
                       "_get_serve_request_context")


def private_ray_uses(path: Path) -> list[str]:
    """Where a file reaches into Ray's internals: a private module or name imported from
    Ray, a private attribute or keyword argument on anything imported from Ray, or one of
    PRIVATE_RAY_MEMBERS on any object."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    ray_names: set[str] = set()  # local names bound to Ray modules or objects
    found = []

    def private(dotted: str) -> bool:
        return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ray":
                    ray_names.add((alias.asname or alias.name).split(".")[0])
                    if private(alias.name):
                        found.append(f"{path.name}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray" and not node.level:
            for alias in node.names:
                ray_names.add(alias.asname or alias.name)
                if private(node.module or "") or private(alias.name):
                    found.append(f"{path.name}:{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            on_ray = isinstance(base, ast.Name) and base.id in ray_names
            if (on_ray and private(node.attr)) or node.attr in PRIVATE_RAY_MEMBERS:
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call):
            func = node.func
            while isinstance(func, ast.Attribute):
                func = func.value
            if isinstance(func, ast.Name) and func.id in ray_names:
                found += [f"{path.name}:{node.lineno}: {kw.arg}=" for kw in node.keywords if kw.arg and private(kw.arg)]
        elif isinstance(node, ast.Name) and node.id in PRIVATE_RAY_MEMBERS:
            found.append(f"{path.name}:{node.lineno}: {node.id}")
        elif isinstance(node, ast.Constant) and node.value in PRIVATE_RAY_MEMBERS:  # getattr(x, "...")
            found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    return sorted(set(found))


def test_private_ray_apis_only_in_the_adapter() -> None:
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py"), ROOT / "run.py"]
    uses = [u for f in files if f not in (ADAPTER, Path(__file__).resolve()) for u in private_ray_uses(f)]
    assert uses == [], "private Ray APIs outside mlplatform/ray_compat.py: " + "; ".join(uses)
    assert private_ray_uses(ADAPTER), "the adapter is where they live (and the check sees them)"


def test_the_ingress_loads_without_torch() -> None:
    """The ingress decodes, resizes, checks and batches; the model replicas run torch. Loading
    torch there too would cost every ingress replica seconds of start-up and its memory."""
    import subprocess
    import sys

    code = ("import sys, mlplatform.deployments.app, mlplatform.deployments.ingress; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout[:300]


def test_the_serve_launcher_resolves_without_torch(tmp_path: Path) -> None:
    """`+mode=serve`'s driver checks each version's weights by their sha256 and builds the
    deploy config; importing torch there would add seconds to every cold start and hundreds
    of MB to a process that stays up as long as the platform."""
    import subprocess
    import sys

    import torch

    from mlplatform.registry.store import Registry

    Registry(str(tmp_path / "registry"), "species-classifier").register({"w": torch.zeros(4)}, {})
    code = ("import sys\n"
            "from mlplatform.cli_check import compose_checked\n"
            "from mlplatform.deployments.serve_mode import Resolved, deploy_schema, resolve_settings\n"
            f"cfg = compose_checked({str(ROOT / 'conf')!r}, ['+mode=serve', 'paths.root={tmp_path}', "
            "'serve.versions=[{ref: v1, role: stable, weight: 100}]'])\n"
            "r = resolve_settings(cfg)\n"
            "assert [a.name for a in deploy_schema(cfg, r).applications][1:] == ['species-v1'], deploy_schema(cfg, r)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout[:300]
