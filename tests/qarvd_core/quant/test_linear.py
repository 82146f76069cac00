import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from qarvd_core.eval.metrics import psnr
from qarvd_core.quant import CalibrationSet, RTNConfig, quantize
from qarvd_core.quant.kernels import BACKENDS, use_backend
from qarvd_core.quant.linear import DualScaleQuantLinear, QuantLinear, pack_int4, set_mode, unpack_int4
from qarvd_core.quant.primitives import QuantSpec
from qarvd_core.sampling import Stream

# The lowest W8A8 PSNR vs the FP model the README reports (Q-ARVD, the paper's method): a backend's
# stream must stay at least this close to simulate mode's.
README_W8A8_PSNR_DB = 43.28


@pytest.fixture(params=[b for b in BACKENDS if b != "cuda"])
def backend(request):
    """Each CPU backend of deploy mode in turn (FBGEMM where torch has it: x86); "cuda" is tested
    by `test_the_cuda_kernels_agree_with_simulate_mode` and in Triton's interpreter."""
    if request.param == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("FBGEMM is built for x86 only")
    use_backend(request.param)
    yield request.param
    use_backend(None)


def _layer(w, b, wb, ab, act_mode="static", sym=False, x=None):
    q = QuantLinear.from_float(w, b, QuantSpec(wb, sym), QuantSpec(ab, False), act_mode)
    if x is not None:
        q.init_activation(x.reshape(-1, x.shape[-1]))
    return q


@pytest.mark.parametrize(
    "wb, ab, act_mode, sym",
    [
        (8, 8, "static", False),
        (8, 8, "static", True),
        (4, 8, "static", False),
        (4, 8, "dynamic", False),
        (8, 6, "static", False),
        (3, 8, "static", True),
        (8, 8, "dynamic", True),
    ],
)
def test_simulate_and_deploy_agree_on_odd_shapes(wb, ab, act_mode, sym, backend):
    g = torch.Generator().manual_seed(wb * 10 + ab)
    w, b = torch.randn(37, 53, generator=g), torch.randn(37, generator=g)
    x = torch.randn(3, 11, 53, generator=g) * 2 + 0.5
    q = _layer(w, b, wb, ab, act_mode, sym, x)
    sim = q(x)
    set_mode(q, "deploy")
    dep = q(x)
    # Stated tolerance: the integer path equals fake quant up to fp32 rounding of the rescale.
    torch.testing.assert_close(dep, sim, atol=1e-4 * sim.abs().max().item(), rtol=1e-4)


def test_int_mm_path_matches_a_float_reference_exactly_in_integers():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(17, 29, generator=g)
    x = torch.randn(1, 29, generator=g)  # a single row: _int_mm still runs
    q = _layer(w, None, 8, 8, x=x)
    set_mode(q, "deploy")
    a = torch.clamp(torch.round(x / q.a_scale) + q.a_zero, 0, 255) - q.a_zero
    ref = (a @ (q.weight_codes().float() - q.w_zero[:, None]).t()) * q.a_scale * q.w_scale
    torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=1e-5)


def test_w8a8_output_sqnr_and_four_bit_weights_are_packed_small():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(256, 256, generator=g), torch.randn(64, 256, generator=g)
    ref = x @ w.t()
    q8 = _layer(w, None, 8, 8, x=x)
    err = (q8(x) - ref).pow(2).mean() / ref.pow(2).mean()
    assert 10 * torch.log10(1 / err) > 30
    q4 = _layer(w, None, 4, 8, x=x)
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.numel() == 256 * 128
    stored = sum(t.numel() * t.element_size() for t in q4.state_dict().values())
    assert w.numel() * 4 / stored >= 7


def test_int4_packing_round_trips_odd_widths():
    codes = torch.randint(-8, 8, (5, 13), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes), 13), codes)


def test_dual_scale_protects_normal_columns():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    w[:, :4] *= 40  # planted outlier columns
    x = torch.randn(256, 128, generator=g)
    ref = x @ w.t()
    single = _layer(w, None, 4, 8, x=x)
    dual = DualScaleQuantLinear.from_float(w, None, torch.arange(32), QuantSpec(4, False), QuantSpec(8, False))
    dual.init_activation(x)
    e_single = (single(x) - ref).pow(2).mean()
    e_dual = (dual(x) - ref).pow(2).mean()
    assert e_dual < e_single / 2
    torch.testing.assert_close(dual.dequantized_weight()[:, 40:], w[:, 40:], atol=0.6, rtol=0)
    set_mode(dual, "deploy")
    torch.testing.assert_close(dual(x), dual.outlier(x[:, :32]) + dual.normal(x[:, 32:]))


def test_each_backend_agrees_with_simulate_mode_per_layer_and_in_the_stream(mini, backend):
    q = quantize(mini, RTNConfig(), CalibrationSet(rollouts=1, chunks=2), progress=False)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    seen: dict = {}

    def keep_first_call(m, inputs, out):
        seen.setdefault(m, (inputs[0], out))

    hooks = [m.register_forward_hook(keep_first_call) for m in layers]
    frames = {}
    for mode in ("simulate", "deploy"):
        set_mode(q, mode)
        frames[mode] = np.concatenate([Stream(q, "islands", 0).step(a) for a in ("right", "down")])
        if mode == "simulate":
            for h in hooks:
                h.remove()
    with torch.inference_mode():
        for m in layers:  # on simulate mode's inputs, so that each layer is compared alone
            x, ref = seen[m]
            sqnr = 10 * torch.log10(ref.pow(2).mean() / (m(x) - ref).pow(2).mean())
            assert sqnr >= 40, (backend, m, float(sqnr))
    assert psnr(frames["deploy"], frames["simulate"]).min() >= README_W8A8_PSNR_DB


# Deploy mode on the "cuda" kernels against simulate mode, per 4/8-bit weights and activation
# scheme; run where `device` is: CUDA, or the CPU with Triton's interpreter (TRITON_INTERPRET=1).
CUDA_KERNELS_AGREE = """
import sys, torch
from qarvd_core.quant.kernels import use_backend
from qarvd_core.quant.linear import QuantLinear, set_mode
from qarvd_core.quant.primitives import QuantSpec
device = sys.argv[1]
use_backend("cuda")  # what CUDA tensors take; on CPU tensors, chosen by hand
for wb, act_mode, sym, dtype in [(4, "static", False, torch.float32), (4, "dynamic", True, torch.float32),
                                 (8, "static", True, torch.float32), (4, "static", True, torch.bfloat16)]:
    g = torch.Generator().manual_seed(wb)
    w, b, x = torch.randn(37, 70, generator=g), torch.randn(37, generator=g), torch.randn(3, 11, 70, generator=g) + 0.3
    q = QuantLinear.from_float(w, b, QuantSpec(wb, sym), QuantSpec(8, False), act_mode)
    q.init_activation(x.reshape(-1, 70))
    q, x = q.to(device), x.to(device, dtype)
    sim = q(x).float()
    dep = set_mode(q, "deploy")(x)
    assert dep.dtype == dtype and dep.shape == sim.shape
    sqnr = 10 * torch.log10(sim.pow(2).mean() / (dep.float() - sim).pow(2).mean())
    assert sqnr >= 40, (wb, act_mode, sym, dtype, float(sqnr))
    if wb == 4:
        assert q._deploy_tensors()["w"].dtype == torch.uint8  # kept packed: unpacked in the kernel
print("ok")
"""


def test_the_triton_int4_kernel_agrees_with_simulate_mode_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when Triton's kernels are defined: a fresh process
    run = subprocess.run([sys.executable, "-c", CUDA_KERNELS_AGREE, "cpu"], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.cuda
def test_the_cuda_kernels_agree_with_simulate_mode():
    run = subprocess.run([sys.executable, "-c", CUDA_KERNELS_AGREE, "cuda"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


needs_fbgemm = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="FBGEMM is built for x86 only"
)


def test_a_quantized_block_traces_as_one_graph_with_the_host_kernels(mini):
    # With no backend forced (the default), tracing a deploy-mode layer must not reach the host
    # probe: a break there splits a compiled block at every quantized layer.
    q = set_mode(quantize(mini, RTNConfig(), CalibrationSet(rollouts=1, chunks=2), progress=False), "deploy")
    seen = {}

    def keep_inputs(module, args, kwargs):
        seen.setdefault("inputs", (args, kwargs))

    hook = q.blocks[0].register_forward_pre_hook(keep_inputs, with_kwargs=True)
    Stream(q, "islands", 0).step("right")
    hook.remove()
    args, kwargs = seen["inputs"]
    explained = torch._dynamo.explain(q.blocks[0])(*args, **kwargs)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


# A frozen compile of an FBGEMM layer after `sys.argv[1]` other weights were packed, so that its
# packed weight's handle differs from one process to the next.
FROZEN_FBGEMM_COMPILE = """
import sys, torch
from qarvd_core.model import compile_inference
from qarvd_core.quant.kernels import fbgemm_pack, use_backend
from qarvd_core.quant.linear import QuantLinear, set_mode
from qarvd_core.quant.primitives import QuantSpec
use_backend("fbgemm")
for _ in range(int(sys.argv[1])):
    fbgemm_pack(torch.ones(4, 4, dtype=torch.int8), torch.zeros(4, dtype=torch.int32), torch.ones(4), None)
torch.manual_seed(0)
w, x = torch.randn(24, 32), torch.randn(20, 32)
q = QuantLinear.from_float(w, torch.randn(24), QuantSpec(8, True), QuantSpec(8, False))
q.init_activation(x)
set_mode(q, "deploy").prepare_compile(frozen=True)
with torch.inference_mode():
    torch.testing.assert_close(compile_inference(q, max_autotune=True)(x), q(x))
"""


@needs_fbgemm
def test_a_frozen_compile_from_the_disk_cache_runs_in_another_process(tmp_path):
    # Frozen, the packed weight's handle is a constant of the compiled graph; inductor's on-disk
    # cache, shared by processes, must not serve one process's handle to another.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    for earlier in (0, 3):
        run = subprocess.run([sys.executable, "-c", FROZEN_FBGEMM_COMPILE, str(earlier)], env=env, capture_output=True)
        assert run.returncode == 0, run.stderr.decode()[-2000:]


@needs_fbgemm
def test_compiled_blocks_call_fbgemm_without_a_graph_break(mini):
    # Compiled, FBGEMM's int8 linear is a custom op taking its packed weight's handle: one graph
    # for the blocks whose weights got as many extra columns (`kernels.fbgemm_columns`), no break
    # at each linear, and the eager stream within the W8A8 PSNR.
    q = set_mode(quantize(mini, RTNConfig(), CalibrationSet(rollouts=1, chunks=2), progress=False), "deploy")
    use_backend("fbgemm")
    try:
        eager = Stream(q, "islands", 0).step("right")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = Stream(q.compile_blocks(), "islands", 0).step("right")
        layouts = {
            tuple(len(m._deploy_tensors()["fbgemm_extra"]) for m in block.modules() if isinstance(m, QuantLinear))
            for block in q.blocks
        }
    finally:
        use_backend(None)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(layouts)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert psnr(compiled, eager).min() >= README_W8A8_PSNR_DB


def test_a_copy_of_a_deploy_mode_layer_runs_after_the_original_is_gone(backend):
    """The deploy cache holds prepacked kernel objects; a deep copy (a second model from one
    loaded checkpoint) must rebuild its own, not keep a handle to the original's."""
    import copy
    import gc

    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(10, 64)
    q = _layer(w, torch.randn(48), 8, 8, x=x)
    set_mode(q, "deploy")
    expected = q(x)
    twin = copy.deepcopy(q)
    del q
    gc.collect()
    torch.testing.assert_close(twin(x), expected)
    # Traced (as compiled blocks are), FBGEMM's layers name their packed weight by handle.
    torch.testing.assert_close(torch.compile(twin, backend="eager")(x), expected)
