"""docs/protocol.md against the code: every message, field, error code, close code and the frame
layout the server uses is documented, nothing documented is missing from the code, the browser
demo and the Python client parse frames the documented way, and the doc's example client works
against a real server.

The server's messages are read from the source (the dicts it sends), so a message type, field,
error code or close code added without documentation fails here.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import typing
from pathlib import Path

import pytest

from service.engine.engine import FrameHeader, frame_message
from service.schemas import ClientMsg

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "protocol.md").read_text()
SERVICE = ROOT / "service"
DEMO = (SERVICE / "static" / "index.html").read_text()


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC, re.S | re.M)
    assert m, f"docs/protocol.md has no '## {title}' section"
    return m.group(1)


def table(title: str) -> dict[str, str]:
    """First column (a `name` or a number) -> the rest of the row, for the section's table rows."""
    rows = {}
    for line in section(title).splitlines():
        m = re.match(r"^\| (?:`(\w+)`|(\d+)) \|(.*)\|$", line)
        if m:
            rows[m.group(1) or m.group(2)] = m.group(3)
    return rows


def fields(cell: str) -> set[str]:
    """Field names: the backticked words outside parentheses, e.g. `seed` in "`seed` (0 to `n`)"."""
    depth, top = 0, []
    for ch in cell:
        depth += (ch == "(") - (ch == ")")
        top.append(ch if depth == 0 and ch != ")" else " ")
    return set(re.findall(r"`(\w+)`", "".join(top)))


# The code side -----------------------------------------------------------------------


def client_messages() -> dict[str, set[str]]:
    out = {}
    for model in typing.get_args(typing.get_args(ClientMsg)[0]):
        for t in typing.get_args(model.model_fields["type"].annotation):
            out[t] = set(model.model_fields) - {"type"}
    return out


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text())) for p in sorted(SERVICE.rglob("*.py"))]


def _dict_keys(d: ast.Dict, tree: ast.Module) -> set[str]:
    """A dict literal's constant keys, following `**f(...)` into f's returned dict literals."""
    keys = {k.value for k in d.keys if isinstance(k, ast.Constant)}
    for k, v in zip(d.keys, d.values):
        if k is None and isinstance(v, ast.Call) and isinstance(v.func, ast.Name):
            for fn in ast.walk(tree):
                if isinstance(fn, ast.FunctionDef) and fn.name == v.func.id:
                    for r in ast.walk(fn):
                        if isinstance(r, ast.Return) and isinstance(r.value, ast.Dict):
                            keys |= _dict_keys(r.value, tree)
    return keys


def server_messages() -> dict[str, set[str]]:
    """Every dict literal the service JSON-encodes with a "type" key: its type and fields."""
    out: dict[str, set[str]] = {}
    for _, tree in _sources():
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and ast.unparse(call.func).endswith("json.dumps") and call.args):
                continue
            d = call.args[0]
            if not isinstance(d, ast.Dict):
                continue
            for k, v in zip(d.keys, d.values):
                if isinstance(k, ast.Constant) and k.value == "type" and isinstance(v, ast.Constant):
                    out.setdefault(v.value, set()).update(_dict_keys(d, tree) - {"type"})
    return out


def _values(node: ast.expr) -> set:
    """The values an expression can take when it is a constant or a conditional of constants."""
    if isinstance(node, ast.Constant):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _values(node.body) | _values(node.orelse)
    return set()


def error_codes() -> set[str]:
    """The constant codes passed to the function that sends `error` messages."""
    codes: set[str] = set()
    for _, tree in _sources():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.AsyncFunctionDef | ast.FunctionDef):
                continue
            sends_error = [
                d
                for d in ast.walk(fn)
                if isinstance(d, ast.Dict)
                and any(isinstance(k, ast.Constant) and k.value == "type" for k in d.keys)
                and any(isinstance(v, ast.Constant) and v.value == "error" for v in d.values)
            ]
            if not sends_error:
                continue
            code_param = next(v.id for k, v in zip(sends_error[0].keys, sends_error[0].values) if k.value == "code")
            pos = [a.arg for a in fn.args.args].index(code_param)
            for call in ast.walk(tree):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == fn.name:
                    arg = call.args[pos]
                    # a constant, or a variable assigned constants (or `a if ... else b`)
                    found = _values(arg)
                    if isinstance(arg, ast.Name):
                        for a in ast.walk(tree):
                            if isinstance(a, ast.Assign) and any(
                                isinstance(t, ast.Name) and t.id == arg.id for t in a.targets
                            ):
                                found |= _values(a.value)
                    codes |= {c for c in found if isinstance(c, str)}
    return codes


def close_codes() -> set[int]:
    """Codes in CLOSE_* constants and the integer literals passed to the functions that close."""
    codes: set[int] = set()
    for _, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                names = [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
                if any(n.startswith("CLOSE_") for n in names):
                    codes |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
            if isinstance(node, ast.Call) and re.search(r"close|_end$", ast.unparse(node.func)):
                codes |= {
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and type(a.value) is int and 1000 <= a.value < 5000
                }
    return codes


def frame_header_fields() -> set[str]:
    """The fields of FrameHeader, after checking that every FrameHeader the service builds passes
    exactly those (so a key cannot be sent without being declared, nor declared and never sent)."""
    declared = set(FrameHeader.__annotations__)
    built = 0
    for _, tree in _sources():
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and ast.unparse(call.func) == "FrameHeader":
                assert {k.arg for k in call.keywords} == declared, ast.unparse(call)
                built += 1
    assert built, "the service builds no FrameHeader"
    return declared


# The checks --------------------------------------------------------------------------


@pytest.mark.parametrize("title, in_code", [("Client messages", client_messages), ("Server messages", server_messages)])
def test_every_message_and_field_is_documented_and_nothing_else(title, in_code):
    code, doc = in_code(), table(title)
    assert set(code) == set(doc)
    for t, names in code.items():
        assert fields(doc[t].split("|")[0]) == names, t


def test_every_error_code_is_documented_and_nothing_else():
    assert error_codes() == set(table("Error codes"))


def test_every_close_code_the_server_uses_is_documented_and_nothing_else():
    assert close_codes() == {int(c) for c in table("Close codes")}


def test_every_frame_header_field_is_documented_and_nothing_else():
    assert frame_header_fields() == set(table("Frame header"))


def test_the_frame_layout_is_the_one_the_server_packs_and_the_clients_parse():
    rows = [r for r in section("Binary frames").splitlines() if re.match(r"^\| (0|4|4 \+ N) \|", r)]
    assert [r.split("|")[1:3] for r in rows] == [[" 0 ", " 4 "], [" 4 ", " N "], [" 4 + N ", " the rest "]]
    assert "unsigned 32-bit integer, big-endian" in rows[0] and "UTF-8 JSON" in rows[1]

    # The server's bytes, read the documented way.
    header = {"frame": 7, "chunk": 2, "action": "left", "note": "é"}
    data = frame_message(header, b"IMAGE")
    (n,) = struct.unpack(">I", data[:4])
    assert json.loads(data[4 : 4 + n].decode("utf-8")) == header and data[4 + n :] == b"IMAGE"

    # The Python client reads the server's bytes back.
    from io import BytesIO

    from PIL import Image

    from tests.support.client import parse_frame

    buf = BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    parsed_header, image = parse_frame(frame_message(header, buf.getvalue()))
    assert parsed_header == header and image.size == (4, 4)

    # The browser demo: DataView.getUint32(0) is big-endian unless told otherwise, the header
    # is decoded as UTF-8 from offset 4 for n bytes, the image starts at 4 + n.
    assert re.search(r"getUint32\(0\)", DEMO)
    assert re.search(r"new TextDecoder\(\)\.decode\(new Uint8Array\(buf, 4, n\)\)", DEMO)
    assert re.search(r"new Uint8Array\(buf, 4 \+ n\)", DEMO)


def test_the_demo_sends_and_handles_only_documented_messages():
    sent = set(re.findall(r'type: "(\w+)"', DEMO)) | set(re.findall(r'type: paused \? "(\w+)" : "(\w+)"', DEMO)[0])
    handled = set(re.findall(r'm\.type === "(\w+)"', DEMO))
    assert sent and sent <= set(table("Client messages"))
    assert handled and handled <= set(table("Server messages"))
    assert '"qarvd"' in DEMO and '"key." + base64url(key)' in DEMO  # the documented subprotocols


def test_the_example_client_in_the_doc_plays_a_session(server):
    m = re.search(r"## Example client.*?```python\n(.*?)```", DOC, re.S)
    assert m, "docs/protocol.md has no example client"
    scope: dict = {}
    exec(compile(m.group(1), "docs/protocol.md", "exec"), scope)
    ready, frames, ended = scope["play"](server.ws_url)
    assert ready["type"] == "ready" and ready["format"] == "png"
    assert len(frames) == 9
    assert all(img.startswith(b"\x89PNG") for _, img in frames)
    assert [h["frame"] for h, _ in frames] == sorted(h["frame"] for h, _ in frames)
    assert set(frames[0][0]) == set(table("Frame header"))
    assert ended is not None and ended["reason"] == "stopped"
