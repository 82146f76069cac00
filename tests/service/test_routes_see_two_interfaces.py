"""The routes reach generation and models through the engine client and jobs through the job
client: they import neither the model store nor the sampler, encoder or checkpoints, and touch
no private part of the engine."""

import ast
from pathlib import Path

import service.api

ROUTES = sorted(Path(service.api.__file__).parent.glob("*.py"))
BEHIND_THE_ENGINE = ("service.store", "qarvd_core.sampling", "qarvd_core.video", "qarvd_core.checkpoint")


def test_routes_import_the_engine_client_not_what_is_behind_it():
    assert len(ROUTES) > 5
    for path in ROUTES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                behind = name.startswith("service.engine.") or any(
                    name == m or name.startswith(m + ".") for m in BEHIND_THE_ENGINE
                )
                assert not behind, f"{path.name} imports {name}"


def test_routes_touch_no_private_part_of_the_engine():
    for path in ROUTES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engine":
                assert not node.attr.startswith("_"), f"{path.name}: engine.{node.attr}"
