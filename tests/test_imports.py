"""The seams between the packages, read from the source (AST, nothing imported): the core
(`qarvd_core`) never reaches the service, neither by an import nor by a command it runs, and
neither package has an import cycle, counting imports inside functions (a cycle hidden in a
function is still a cycle: it only waits for the call).

An import of `a.b.c` is an edge to the module `a.b.c` alone: the packages `a` and `a.b` it
initializes on the way are not edges, so a package's __init__ re-exporting its modules is no cycle.
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qarvd_core", "service")
# A command string or argv element that runs the service: `-m service`, `service.cli:serve`, ...
SERVICE_MODULE = re.compile(r"service(\.\w+)*(:\w+)?")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of PACKAGES under `root`."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def parsed(path: Path) -> ast.AST:
    return _parse(path.read_text())


@functools.cache  # by source text: each check reads every file, and a changed file parses anew
def _parse(source: str) -> ast.AST:
    return ast.parse(source)


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports, anywhere in the file; first-party ones resolved to the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            targets |= {_nearest(alias.name, known) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from pkg import mod` imports pkg.mod; `from mod import name`, mod
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else _nearest(base, known))
    return targets - {name}


def _nearest(dotted: str, known: set[str]) -> str:
    """The longest known module that `dotted` is or lies in (itself when it is not first-party)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return dotted


def graph(root: Path) -> dict[str, set[str]]:
    """First-party import graph of PACKAGES under `root`."""
    found = modules(root)
    return {name: imported(name, path, set(found)) & set(found) for name, path in found.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def runs_the_service(path: Path) -> list[str]:
    """String constants in the file that name a service module to run: `-m service` in a command
    string, "-m", "service..." in an argv list, or a bare "service.x" / "service.x:attr"."""
    hits = []
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if SERVICE_MODULE.fullmatch(node.value) or re.search(r"-m\s+service\b", node.value):
                hits.append(node.value)
    return hits


def service_reach(root: Path) -> list[str]:
    """Every way a core module reaches the service, as 'module: what'."""
    found = modules(root)
    reach = []
    for name, path in found.items():
        if name.startswith("qarvd_core"):
            targets = imported(name, path, set(found))
            reach += [f"{name}: imports {t}" for t in sorted(targets) if SERVICE_MODULE.fullmatch(t)]
            reach += [f"{name}: runs {s!r}" for s in runs_the_service(path)]
    return reach


def test_the_core_never_reaches_the_service():
    assert service_reach(ROOT) == []


def test_neither_package_has_an_import_cycle():
    found = cycle(graph(ROOT))
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_check_catches_a_cycle_in_a_function_and_a_spawned_service(tmp_path):
    """The checks above, on a copy of the packages with each mistake put back in."""
    skip = shutil.ignore_patterns("weights", "static", "__pycache__")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=skip)
    api = tmp_path / "qarvd_core/quant/api.py"
    hidden = "\n\ndef base_sha(p):\n    from qarvd_core.checkpoint import sha256_of\n\n    return sha256_of(p)\n"
    api.write_text(api.read_text() + hidden)
    found = cycle(graph(tmp_path))
    assert found is not None and "qarvd_core.checkpoint" in found and "qarvd_core.quant.api" in found
    video = tmp_path / "qarvd_core/video.py"
    spawns = 'WORKER = [sys.executable, "-m", "service", "worker"]\nSHELL = "python -m service.cli serve"\n'
    video.write_text(video.read_text() + "\n\n" + spawns + "\n\ndef later():\n    import service.main\n")
    assert sorted(service_reach(tmp_path)) == [
        "qarvd_core.video: imports service.main",
        "qarvd_core.video: runs 'python -m service.cli serve'",
        "qarvd_core.video: runs 'service'",
    ]
