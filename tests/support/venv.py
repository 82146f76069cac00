"""A fresh virtual environment holding only the distributions a requirement pulls in, linked from
this interpreter's environment instead of unpacked again: an install replayed in it finds them
already satisfied, and a package only the test environment has (pytest, httpx, ...) is not there
to hide a missing dependency."""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def dependencies(requirement: str) -> list[metadata.Distribution]:
    """The installed distributions `requirement` (e.g. "qarvd[serve,wan]") needs, itself excluded,
    with their markers evaluated for this interpreter. One not installed here is left to pip."""
    installed = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    root = Requirement(requirement)
    extras_of: dict[str, set[str]] = {}
    todo = [(canonicalize_name(root.name), set(root.extras))]
    while todo:
        name, extras = todo.pop()
        if name not in installed or (name in extras_of and extras <= extras_of[name]):
            continue
        extras_of[name] = extras_of.get(name, set()) | extras
        for req in map(Requirement, installed[name].requires or []):
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras_of[name] | {""}):
                todo.append((canonicalize_name(req.name), set(req.extras)))
    extras_of.pop(canonicalize_name(root.name))
    return [installed[name] for name in extras_of]


def linked_venv(path: Path, requirement: str) -> Path:
    """A venv at `path` holding symlinks to the top-level files of pip and of each of
    `requirement`'s dependencies, and a `pip` command; returns its bin/."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for dist in [metadata.distribution("pip"), *dependencies(requirement)]:
        # Scripts (../../bin) and .pth hooks are the installer's business; __pycache__ is rebuilt.
        for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not top.endswith(".pth"):
                (site / top).symlink_to(dist.locate_file(top))
    pip = path / "bin" / "pip"
    pip.write_text(
        f"#!{path / 'bin' / 'python'}\nimport sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n"
    )
    pip.chmod(0o755)
    return path / "bin"
