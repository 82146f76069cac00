"""The device setting (QARVD_DEVICE / --device): resolution, refusals, and models, caches and
noise landing where asked. Tests marked `cuda` run only where a CUDA device is (the first step
of benchmarks/device_check.sh); this file imports nothing beyond the core, so that script can
run it on a host without the service's packages."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from qarvd_core import runtime
from qarvd_core.checkpoint import load_model, save_weights
from qarvd_core.cli import app
from qarvd_core.quant import CalibrationSet, QuantLinear, RTNConfig, quantize
from qarvd_core.quant.api import target_linears
from qarvd_core.quant.calibration import collect_inputs
from qarvd_core.quant.linear import set_compute_dtype, set_mode
from qarvd_core.sampling import Stream, step_streams
from tests.conftest import mini_model

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("value", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu:0", "", "mps"])
def test_unknown_devices_are_refused_saying_what_is_accepted(value):
    with pytest.raises(ValueError, match="choose auto, cpu, cuda or cuda:N"):
        runtime.resolve_device(value)


def test_auto_is_cuda_when_available_else_cpu():
    assert runtime.resolve_device("auto") == (torch.device("cuda", 0) if HAS_CUDA else torch.device("cpu"))
    assert runtime.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="this host has CUDA")
@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_on_a_host_without_it_is_refused(value):
    with pytest.raises(ValueError, match="sees no CUDA device"):
        runtime.resolve_device(value)


def test_the_cuda_plan_runs_bf16_around_cublas_int8_and_honours_forced_settings():
    # Pure resolution: no CUDA device is touched, so this runs on every host.
    p = runtime.plan(device="cuda:0")
    assert (p.device, p.dtype, p.kernels, p.compile) == ("cuda:0", "bf16", "cuda", False)
    assert p.describe().startswith("device cuda:0; dtype bf16 (CUDA")
    forced = runtime.plan("fp32", True, device="cuda:0")
    assert (forced.dtype, forced.compile) == ("fp32", True)
    with pytest.raises(ValueError, match="unknown dtype"):
        runtime.plan("fp16", device="cuda:0")
    assert runtime.plan(device="cpu").device == "cpu"


@pytest.mark.parametrize("asked", ["cpu", "auto"])
def test_a_model_and_its_streams_live_where_asked(asked, tmp_path):
    path = save_weights(mini_model(), tmp_path / "m.safetensors", preset=None)
    device = runtime.resolve_device(asked)
    model = load_model(str(path), device=str(device))
    assert {p.device for p in model.parameters()} == {device}
    a, b = Stream(model, "forest", 1), Stream(model, "desert", 2)
    assert a.cache.k.device == device and a.generator.device == device
    frames = step_streams([a, b], ["left", "up"])
    assert frames[0].shape[-1] == 3 and a.cache.k.device == device


def test_cli_commands_refuse_an_unknown_device_by_flag_and_by_environment(tmp_path):
    runner = CliRunner()
    for args, env in (
        (["bench", "--model", "tiny-world", "--device", "gpu"], {}),
        (["generate", "--out", str(tmp_path / "v.mp4")], {"QARVD_DEVICE": "gpu"}),
        (["eval", "--model", "tiny-world", "--json", str(tmp_path / "e.json"), "--device", "gpu"], {}),
        (["analyze", "outliers", "--json", str(tmp_path / "o.json"), "--device", "gpu"], {}),
    ):
        r = runner.invoke(app, args, env=env)
        assert r.exit_code != 0 and "unknown device 'gpu'" in r.output, (args, r.output)


# ----------------------------------------------------------------------------- on a CUDA device


@pytest.mark.cuda
def test_cuda_streams_batch_as_they_step_alone():
    model = mini_model().to("cuda")
    alone = [Stream(model, "forest", s) for s in (1, 2)]
    batched = [Stream(model, "forest", s) for s in (1, 2)]
    assert alone[0].generator.device.type == "cuda"
    for act in ("left", "up", "none"):
        one = [s.step(act) for s in alone]
        two = step_streams(batched, [act, act])
        for x, y in zip(one, two):
            assert abs(x.astype(int) - y.astype(int)).max() <= 1


@pytest.mark.cuda
def test_cuda_int8_deploy_matches_simulate_in_bf16(tmp_path):
    base = mini_model()
    q = quantize(base, RTNConfig(w_bits=8, a_bits=8), CalibrationSet(rollouts=1, chunks=2), progress=False)
    sim = set_compute_dtype(q.to("cuda"), torch.bfloat16)
    x = torch.randn(64, sim.blocks[0].ffn[0].in_features, device="cuda", dtype=torch.bfloat16)
    layer = sim.blocks[0].ffn[0]
    assert isinstance(layer, QuantLinear)
    want = layer(x).float()
    set_mode(sim, "deploy")
    got = layer(x).float()
    sqnr = 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean())
    assert sqnr > 30, sqnr


@pytest.mark.cuda
def test_cuda_calibration_keeps_captured_activations_on_the_cpu():
    model = mini_model().to("cuda")
    layers = target_linears(model, RTNConfig().keep_fp)
    inputs = collect_inputs(model, layers, CalibrationSet(rollouts=1, chunks=2, tokens_per_pass=16), progress=False)
    rows = next(iter(inputs.values()))
    assert all(x.device.type == "cpu" for x in rows.x)
    assert rows.stacked()[0].device.type == "cuda"  # handed to the layer's device one layer at a time
    q = quantize(model, RTNConfig(w_bits=8, a_bits=8), CalibrationSet(rollouts=1, chunks=2), progress=False)
    assert {p.device.type for p in q.buffers()} == {"cuda"}
