import json

from typer.testing import CliRunner

from qarvd_core.cli import app
from qarvd_core.eval.evaluate import EvalConfig, _revisit_pairs, evaluate, write_report

SMALL = EvalConfig(scenarios=3, frames=12, drift_frames=30)


def test_model_against_itself_is_perfect_and_against_another_is_not(mini, make_mini, tmp_path):
    examples: list = []
    same = evaluate(mini, mini, SMALL, revisit_examples=examples)
    assert same["psnr_db_mean"] == 100 and abs(same["ssim_mean"] - 1) < 1e-9
    assert len(same["psnr_db_per_chunk"]) == 4 and same["frames"] == 36
    assert same["action_accuracy_simulator"] > 0.9
    per_policy = same["action_accuracy_per_policy"]  # 3 scenarios: one of each script
    assert set(per_policy) == {"random_walk", "patrol", "go_and_return"}
    assert abs(sum(per_policy.values()) / 3 - same["action_accuracy"]) < 1e-9
    # The simulator redraws a revisited place (entities aside); other places look different.
    assert same["revisit_pairs"] > 0
    assert same["revisit_psnr_db_simulator"] > same["revisit_other_places_psnr_db_simulator"] + 20
    assert examples and all(len(e) == 4 and e[0].shape == (64, 64, 3) for e in examples)
    written = write_report(same, tmp_path / "e.json", "t", examples)
    assert written[-1].name == "e-revisits.png" and written[-1].stat().st_size > 1000
    other = evaluate(mini, make_mini(seed=1), SMALL)
    assert other["psnr_db_mean"] < 40
    worlds = other["psnr_db_per_scenario"]  # the mean is over worlds of equal length
    assert len(worlds) == 3 and abs(sum(worlds) / 3 - other["psnr_db_mean"]) < 1e-6
    d = other["drift"]
    assert d["frames"] == 30 and d["streams"] == 4 and len(d["sharpness_curve"]) == len(d["curve_frame"])


def test_revisit_pairs_need_a_round_trip():
    import numpy as np

    cam = np.array([[0, 0], [1, 0], [2, 0], [1, 0], [0, 0], [0, 0]])
    assert _revisit_pairs(cam, 9) == [(1, 3), (0, 4), (0, 5)]
    assert _revisit_pairs(cam, 3) == [(1, 3)]


def test_eval_cli_writes_json_markdown_and_plot(mini_weights, tmp_path):
    path, _ = mini_weights
    out = tmp_path / "r" / "eval.json"
    out.parent.mkdir()
    r = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(path),
            "--reference",
            str(path),
            "--json",
            str(out),
            "--scenarios",
            "2",
            "--frames",
            "9",
            "--drift-frames",
            "30",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["psnr_db_mean"] == 100 and "action_accuracy" in res and "drift" in res
    assert out.with_suffix(".md").read_text().startswith("# qarvd eval")
    assert out.with_suffix(".png").stat().st_size > 1000


def test_eval_split_is_checked_and_reported(mini_weights, tmp_path):
    path, _ = mini_weights
    base = ["eval", "--model", str(path), "--scenarios", "1", "--frames", "6", "--drift-frames", "30"]
    r = CliRunner().invoke(app, [*base, "--json", str(tmp_path / "a.json"), "--split", "train"])
    assert r.exit_code == 2 and "--split must be heldout or calibration" in r.output
    assert not (tmp_path / "a.json").exists()
    r = CliRunner().invoke(app, [*base, "--json", str(tmp_path / "c.json"), "--split", "calibration"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c.json").read_text())["config"]["split"] == "calibration"
    assert "action accuracy (calibration)" in (tmp_path / "c.md").read_text()
