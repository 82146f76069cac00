import json
import os
from importlib.metadata import Distribution

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qarvd_core.cli import app, load_plugin
from qarvd_core.quant.kernels import BACKENDS
from qarvd_core.video import read_mp4

runner = CliRunner()


def test_generate_writes_mp4_frames_and_json(mini_weights, tmp_path):
    path, _ = mini_weights
    out, frames = tmp_path / "demo.mp4", tmp_path / "frames"
    r = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(path),
            "--prompt",
            "snow",
            "--seed",
            "3",
            "--actions",
            "right*4,down*3",
            "--out",
            str(out),
            "--scale",
            "2",
            "--frames-dir",
            str(frames),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["frames"] == 7 and info["fps"] > 0 and info["chunk_ms"]["p95"] >= info["chunk_ms"]["p50"] > 0
    assert read_mp4(out).shape == (7, 128, 128, 3)
    assert sorted(p.name for p in frames.iterdir()) == [f"{i:06d}.png" for i in range(7)]


def test_generate_is_reproducible(mini_weights, tmp_path):
    from PIL import Image

    path, _ = mini_weights
    dirs = []
    for name in ("a", "b"):
        d = tmp_path / name
        r = runner.invoke(
            app,
            [
                "generate",
                "--model",
                str(path),
                "--actions",
                "left*3",
                "--seed",
                "9",
                "--out",
                str(tmp_path / f"{name}.mp4"),
                "--frames-dir",
                str(d),
            ],
        )
        assert r.exit_code == 0, r.output
        dirs.append(np.stack([np.asarray(Image.open(d / f"{i:06d}.png")) for i in range(3)]))
    np.testing.assert_array_equal(*dirs)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--prompt", "moon"], "unknown prompt"),
        (["--actions", "right*2,jump"], "unknown action"),
        (["--actions", "right*"], "malformed action"),
        (["--actions", "right*10,none*100000000000000000000000"], "over the limit of 9600"),
        (["--actions", "none*9601"], "9601 frames is over the limit of 9600"),
        (["--out", "/nonexistent-dir/x.mp4"], "does not exist"),
        (["--out", "video.avi"], "must end in .mp4"),
        (["--out", "mini.json/x.mp4"], "is not a directory"),
    ],
)
def test_generate_errors_are_one_clear_message(mini_weights, tmp_path, args, message):
    path, _ = mini_weights
    base = {"--model": str(path), "--out": str(tmp_path / "x.mp4"), "--actions": "right*3"}
    base.update(dict(zip(args[::2], args[1::2])))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = runner.invoke(app, ["generate", *[x for kv in base.items() for x in kv]])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini.json", "mini.safetensors"]


def test_unwritable_output_directory(mini_weights, tmp_path):
    path, _ = mini_weights
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user that can write anywhere")
    r = runner.invoke(app, ["generate", "--model", str(path), "--out", str(locked / "x.mp4")])
    assert r.exit_code == 2 and "not writable" in r.output


def test_bench_reports_chunk_latency_and_fps(mini_weights, tmp_path):
    path, _ = mini_weights
    out = tmp_path / "b.json"
    r = runner.invoke(
        app, ["bench", "--model", str(path), "--chunks", "4", "--warmup", "1", "--json", str(out), "--profile"]
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["chunks"] == 4 and res["fps"] > 0 and res["threads"] >= 1
    assert abs(sum(res["time_share"].values()) - 1) < 0.01 and "linear" in res["time_share"]
    # The host, and what `auto` chose on it and why.
    assert res["host"]["capability"] == torch.backends.cpu.get_cpu_capability() and res["host"]["cpu"]
    assert res["kernels"] in BACKENDS and res["dtype"] in ("float32", "bfloat16")
    assert set(res["plan"]) == {"dtype", "compile", "kernels"} and "torch capability" in r.output


def test_bench_profile_of_compiled_blocks_splits_them_into_kernels(mini_weights, tmp_path):
    path, _ = mini_weights
    out = tmp_path / "b.json"
    argv = ["bench", "--model", str(path), "--chunks", "2", "--warmup", "1", "--json", str(out)]
    r = runner.invoke(app, [*argv, "--compile", "--profile"])
    assert r.exit_code == 0, r.output
    share = json.loads(out.read_text())["time_share"]
    # Without kernel events a compiled block is one opaque graph call; its fused loops must be seen.
    fused = next(v for k, v in share.items() if k.startswith("fused elementwise"))
    assert fused > 0 and share["linear"] > 0 and share["attention"] > 0


def test_bench_max_autotune_needs_compile(mini_weights):
    path, _ = mini_weights
    r = runner.invoke(app, ["bench", "--model", str(path), "--max-autotune"])
    assert r.exit_code == 2 and "--max-autotune needs --compile" in r.output


def test_every_command_has_help():
    for cmd in ("train", "generate", "eval", "bench", "serve", "worker"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output
    assert "--port" in runner.invoke(app, ["serve", "--help"]).output  # the service's own command


def test_a_command_whose_extra_is_not_installed_says_how_to_install_it(tmp_path):
    """What `qarvd serve` does where only the core is installed: a `qarvd.commands` entry point
    whose extra's packages are missing explains itself instead of failing on an import."""
    info = tmp_path / "demo_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: demo-plugin\nVersion: 1.0\nProvides-Extra: web\n"
        'Requires-Dist: numpy>=1\nRequires-Dist: no-such-dist-for-qarvd>=1; extra == "web"\n'
    )
    (info / "entry_points.txt").write_text("[qarvd.commands]\nweb = no_such_module:web [web]\n")
    (ep,) = Distribution.at(info).entry_points
    command = load_plugin(ep)
    r = runner.invoke(command, ["--help"])
    help_text = " ".join(r.output.split())
    assert r.exit_code == 0 and '(no-such-dist-for-qarvd): pip install "demo-plugin[web]"' in help_text
    assert "numpy" not in help_text  # installed, and not the extra's
    r = runner.invoke(command, ["--port", "1"])
    assert r.exit_code == 2 and "error: `qarvd web` needs packages that are not installed" in r.output


def test_bench_batched_sessions_count_every_sessions_frames(mini_weights, tmp_path):
    path, _ = mini_weights
    out = tmp_path / "b.json"
    r = runner.invoke(app, ["bench", "--model", str(path), "--chunks", "3", "--sessions", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["sessions"] == 3
    assert res["fps"] * res["chunk_ms"]["mean"] / 1000 == pytest.approx(3 * res["frames_per_chunk"], rel=1e-6)
