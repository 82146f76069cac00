"""`qarvd bench`: streaming speed of a model, warm-up excluded, threads stated."""

from __future__ import annotations

import re
import time
from dataclasses import asdict

import numpy as np
import torch

from qarvd_core.model import WorldModel
from qarvd_core.quant import kernels
from qarvd_core.sampling import DEFAULT_ACTION_GUIDANCE, Stream, step_streams
from qarvd_core.world.simulator import ACTIONS

# Profiler op names grouped into what a reader cares about. Compiled blocks show up as one
# event per graph call unless their kernels are profiled too (`profile_compiled_kernels`):
# inductor's GEMM templates are then "gemm_m..n..k.._kernel", its fused loops "cpp_fused_...".
_OP_GROUPS = {
    "linear": ("aten::addmm", "aten::mm", "aten::linear", "aten::_int_mm", "aten::bmm", "onednn::qlinear", "gemm_"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "patch embedding": ("aten::convolution", "aten::mkldnn_convolution", "aten::conv3d"),
    "fused elementwise (compiled: norms, RoPE, modulation, activation quantize)": ("cpp_fused",),
    "compiled-graph calls and guard checks": (
        "## Call CompiledFxGraph",
        "TorchDynamo Cache Lookup",
        "Torch-Compiled Region",
        "AOTDispatcher",
        "Pregraph bytecode",
    ),
}


def profile_compiled_kernels():
    """Context in which graphs compiled give every kernel its own profiler event (inductor's
    `cpp.enable_kernel_profile`), so that `_profile` can split compiled blocks into GEMMs and
    fused elementwise loops. Graphs compile at their first call: run the stream inside it.

    Every model shares Block.forward's code, so a graph compiled earlier in the process for the
    same shapes (without kernel events) would be reused: the compile caches are reset first.
    """
    import torch._inductor.config as inductor_config

    torch.compiler.reset()
    return inductor_config.patch({"cpp.enable_kernel_profile": True})


def bench_stream(
    model: WorldModel,
    chunks: int = 40,
    warmup: int = 5,
    prompt: str = "islands",
    seed: int = 0,
    profile: bool = False,
    sessions: int = 1,
    action_guidance: float = DEFAULT_ACTION_GUIDANCE,
) -> dict:
    """Time `chunks` chunks of live streams (cycling actions) after `warmup` chunks.

    With `sessions` > 1 the streams step together in one batched pass (`step_streams`, as
    the server batches sessions); frames/s then counts every session's frames.
    """
    streams = [Stream(model, prompt, seed + i, action_guidance=action_guidance) for i in range(sessions)]
    rng = np.random.default_rng(seed)

    def step():
        if model.args.n_actions:
            step_streams(streams, [ACTIONS[rng.integers(len(ACTIONS))] for _ in streams])
        else:  # a text model takes no actions
            step_streams(streams, [None] * len(streams))

    for _ in range(warmup):
        step()
    times = []
    for _ in range(chunks):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    fr = streams[0].frames_per_chunk  # frames a chunk yields (a Wan model's decoded frames)
    result = {
        "chunks": chunks,
        "warmup_chunks": warmup,
        "frames_per_chunk": fr,
        "chunk_ms": {
            "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)),
            "mean": float(ms.mean()),
        },
        "sessions": sessions,
        "action_guidance": action_guidance,
        "fps": float(fr * chunks * sessions / ms.sum() * 1000),
        # Stored keys and values of one stream (tensor bytes), as `kv_bits` stores them.
        "kv_cache_bytes_per_stream": streams[0].cache.full_nbytes,
        "kv_bits": None if streams[0].cache.quant is None else streams[0].cache.quant.to_dict(),
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "host": asdict(kernels.probe_host()),
        "kernels": kernels.active_backend(),  # of quantized layers in deploy mode
    }
    if profile:
        result["time_share"] = _profile(streams[0], min(10, chunks))
    return result


def _profile(stream: Stream, chunks: int) -> dict:
    """Share of self CPU time per op group over `chunks` chunks."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(chunks):
            stream.step("right")
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        name = re.sub(r"^graph_\d+_", "", ev.key)  # a profiled compiled kernel: graph_<id>_<kernel>
        group = next(
            (g for g, names in _OP_GROUPS.items() if name.startswith(names)),
            "other (norms, RoPE, modulation, copies)",
        )
        totals[group] = totals.get(group, 0.0) + ev.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {k: round(v / whole, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
