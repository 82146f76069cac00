"""benchmarks/device_check.sh as a host without a GPU runs it: its CPU part, so the GPU check
cannot rot between the sessions that have a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_check_runs_its_cpu_part_without_a_gpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(
        ["bash", "benchmarks/device_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "device_check_cpu.json").read_text())
    assert (tmp_path / "device_check_cpu.md").read_text().startswith("# Device check: cpu")
    rows = {(row["mode"], row["sessions"]): row for row in result["rows"]}
    base = result["plan"].split("dtype ")[1].split()[0]
    assert set(rows) == {(mode, n) for mode in (base, "w8a8", "w4a8") for n in (1, 2)}
    assert not any("error" in row for row in rows.values())
    assert all(row["frames_per_s"] > 0 and row["chunk_ms_p95"] >= row["chunk_ms_p50"] > 0 for row in rows.values())
    # The sweep's multiple of one session, from the same run; warmed up, nothing compiles while timed.
    for (mode, _), row in rows.items():
        assert row["x_one_session"] == round(row["frames_per_s"] / rows[mode, 1]["frames_per_s"], 2)
        assert row["compiles_while_timed"] == 0 and "cudagraph_skips" not in row  # counted on CUDA only
    assert result["cudagraph_skips"] is None
    assert (
        "CUDA graphs skipped in compiled rows: no compiled CUDA row" in (tmp_path / "device_check_cpu.md").read_text()
    )
    w8, w4 = rows["w8a8", 1], rows["w4a8", 1]
    assert w8["bf16_over_quantized"] >= 1.9 and w4["bf16_over_quantized"] >= 3.5  # the size bars
    assert w8["sqnr_vs_base_db"] > w4["sqnr_vs_base_db"] > 10  # deploy mode draws the base model's chunk
