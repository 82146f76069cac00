import json

import torch
from typer.testing import CliRunner

from qarvd_core.cli import app
from qarvd_core.quant.analysis import outlier_map

runner = CliRunner()


def test_outlier_map_counts_planted_outliers_by_type_and_depth(make_mini):
    model = make_mini()
    with torch.no_grad():
        model.blocks[1].self_attn.o.weight[:, :2] *= 50
    result = outlier_map(model)
    by_layer = {r["layer"]: r for r in result["layers"]}
    assert by_layer["blocks.1.self_attn.o"]["outliers"] == 16 and by_layer["blocks.1.self_attn.o"]["depth"] == 1
    assert result["total_layers"] == 2 * 10 and "text_embedding.0" not in by_layer


def test_analyze_and_quantize_cli_end_to_end(mini_weights, tmp_path):
    path, _ = mini_weights
    r = runner.invoke(
        app,
        [
            "analyze",
            "sensitivity",
            "--model",
            str(path),
            "--rollouts",
            "1",
            "--chunks",
            "3",
            "--json",
            str(tmp_path / "s.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert len(s["chunk_mse"]) == 3 and all(e > 0 for e in s["chunk_mse"]) and (tmp_path / "s.png").exists()
    r = runner.invoke(app, ["analyze", "outliers", "--model", str(path), "--json", str(tmp_path / "o.json")])
    assert r.exit_code == 0 and (tmp_path / "o.png").exists()

    out = tmp_path / "q8.safetensors"
    r = runner.invoke(
        app,
        [
            "quantize",
            "--model",
            str(path),
            "--method",
            "gptq",
            "--w-bits",
            "8",
            "--a-bits",
            "8",
            "-o",
            "act_mode=dynamic",
            "--out",
            str(out),
            "--calib-rollouts",
            "1",
            "--calib-chunks",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(out.with_suffix(".json").read_text())["evaluation"]["psnr_db_mean"] > 25
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "gptq  W8A8" in r.output and "evaluation" in r.output
    assert "activations per-token dynamic" in r.output
    # Eager: compiling the quantized blocks is test_checkpoint's and test_cli's to check.
    generate = [
        "generate",
        "--model",
        str(out),
        "--actions",
        "right*3",
        "--no-compile",
        "--out",
        str(tmp_path / "q.mp4"),
    ]
    r = runner.invoke(app, generate)
    assert r.exit_code == 0, r.output


def test_quantize_cli_refuses_bad_input_before_work(mini_weights, tmp_path):
    path, _ = mini_weights
    for args, message in (
        (["--method", "awq"], "unknown method"),
        (["--w-bits", "9"], "w_bits"),
        (["-o", "nonsense"], "KEY=VALUE"),
        (["-o", "alpha=0.5"], "unknown option"),
    ):
        r = runner.invoke(app, ["quantize", "--model", str(path), "--out", str(tmp_path / "x.safetensors"), *args])
        assert r.exit_code == 2 and message in r.output, r.output
    assert not list(tmp_path.glob("x*"))
