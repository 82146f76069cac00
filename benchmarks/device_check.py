"""The device check: streaming speed and memory of tiny-world, small-world and the Wan 2.1 1.3B
causal layout, base dtype vs W8A8 and W4A8 deploy mode, at 1 and 4 sessions, in one process.

Run it through `bash benchmarks/device_check.sh` (which runs the CUDA-marked tests first). On a
CUDA device the base dtype is bf16 (`qarvd_core.runtime.plan`); without one it runs its CPU part,
tiny-world only and short, so that it cannot rot. It needs only the core (torch, numpy,
safetensors): no service packages, no PyAV, no network.

Per row: time to first frame of a new stream on a warmed-up process, chunk latency p50/p95 after
warm-up (the cache filled to its window), frames per second over all sessions (model frames: for
the 1.3B layout latent frames, each 4 video frames through its VAE) and as a multiple of one
session's (the batch-size sweep: where more sessions stop paying), peak device memory, the
quantized layers' weight bytes against the same layers in bf16, and the first chunk's SQNR
against the base model's (same seeds). Compiled rows are warmed up as the server warms a model
at load (a chunk before any is timed), with inductor's CUDA graphs on CUDA as the server runs
them: their warm-up seconds, the graphs compiled while timed (0 when the warm-up covers every
shape) and the CUDA graphs inductor skipped when it compiled them (the reason is in its log),
summed in a pass/fail line: 0 expected, as the blocks write only into the model's batch buffers,
which are static addresses (`batch_buffers`). tiny-world runs its
shipped weights; small-world and the 1.3B layout random weights of unit-scale outputs
(tests/support/wan_card.py). Biome models step real streams as the server does (`step_streams`:
per-stream caches and noise, frames to uint8 on the host); the 1.3B layout has no text encoder
or VAE here, so its rows time the transformer's chunk (`denoise_chunk` over a batched cache,
random text states), latents copied to the host.

    python benchmarks/device_check.py [--out DIR] [--cpu] [--models NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qarvd_core import runtime  # noqa: E402
from qarvd_core.checkpoint import DTYPES, load_model  # noqa: E402
from qarvd_core.model import KVCache, ModelArgs, WorldModel  # noqa: E402
from qarvd_core.quant import QuantLinear, RTNConfig, set_compute_dtype, set_mode  # noqa: E402
from qarvd_core.quant.api import swap_module, target_linears  # noqa: E402
from qarvd_core.sampling import (  # noqa: E402
    Sampler,
    Stream,
    batch_buffers,
    chunk_actions,
    denoise_chunk,
    step_streams,
)
from qarvd_core.world.simulator import ACTIONS  # noqa: E402
from tests.support.wan_card import random_wan_state  # noqa: E402

MODES = {"w8a8": (8, 8), "w4a8": (4, 8)}  # beside the base dtype's row
SWEEP = [1, 2, 4, 8, 16]  # sessions of the batch-size sweep
ROWS_PER_LAYER = 2048  # activation rows per layer for the static ranges


def build(name: str, device: str, dtype: torch.dtype) -> WorldModel:
    if name == "tiny-world":
        return load_model(name, dtype=dtype, device=device)
    args = ModelArgs.from_name(name)
    model = WorldModel(args)
    model.load_state_dict(random_wan_state(args))
    return model.to(device=device, dtype=dtype).eval()


def stepper(model: WorldModel, sessions: int, seed: int = 0):
    """A function that makes the next chunk of `sessions` new streams and brings it to the host."""
    if model.args.n_prompts:
        streams = [Stream(model, "islands", seed + i) for i in range(sessions)]
        rng = np.random.default_rng(seed)
        return lambda: step_streams(streams, [ACTIONS[rng.integers(len(ACTIONS))] for _ in streams])
    a, p = model.args, next(model.parameters())
    g = torch.Generator(p.device).manual_seed(seed)
    cache = KVCache(a, sessions, p.device, p.dtype, buffers=batch_buffers(model, sessions))  # as step_streams
    text = torch.randn(sessions, a.text_len, a.text_dim, generator=g, device=p.device).to(p.dtype)
    context = model.embed_text(text)
    ids = torch.stack([chunk_actions(model, None)] * sessions).to(p.device)
    sampler = Sampler.for_model(model)
    shape = (sessions, a.frames_per_chunk, a.in_channels, a.frame_height, a.frame_width)

    def noise():
        return torch.randn(shape, generator=g, device=p.device).to(p.dtype)

    return lambda: [x.float().cpu().numpy() for x in denoise_chunk(model, cache, context, ids, noise, sampler)]


def capture_rows(model: WorldModel, keep_fp: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Inputs of each quantizable layer in one chunk of the base model, for static activation ranges.
    (The 1.3B layout has no text encoder here, so no calibration rollouts: one chunk's rows stand in.)"""
    rows, gen = {}, torch.Generator().manual_seed(0)

    def hook(name):
        def record(_module, inputs, _output):
            if name not in rows:
                x = inputs[0].reshape(-1, inputs[0].shape[-1])
                rows[name] = x[torch.randperm(len(x), generator=gen)[:ROWS_PER_LAYER]].float().cpu()

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in target_linears(model, keep_fp).items()]
    try:
        stepper(model, 1)()
    finally:
        for h in handles:
            h.remove()
    return rows


@torch.no_grad()
def quantized(model: WorldModel, bits: tuple[int, int], rows: dict[str, torch.Tensor], dtype) -> WorldModel:
    """RTN weights (per channel, min-max) and static per-tensor activation ranges, in deploy mode."""
    config = RTNConfig(w_bits=bits[0], a_bits=bits[1])
    q = copy.deepcopy(model)
    for name, lin in target_linears(q, config.keep_fp).items():
        layer = QuantLinear.from_float(lin.weight, lin.bias, config.w_spec, config.a_spec, "static", "minmax")
        layer.init_activation(rows[name].to(lin.weight.device))
        swap_module(q, name, layer.to(lin.weight.device))
    return set_mode(set_compute_dtype(q, dtype), "deploy")


def weight_bytes(model: WorldModel) -> tuple[int, int]:
    """(bytes of the quantized layers' weights, scales and zero points; bytes of those weights in bf16)."""
    quant = bf16 = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            quant += sum(t.nbytes for t in (m.qweight, m.w_scale, m.w_zero))
            bf16 += m.in_features * m.out_features * 2
    return quant, bf16


def measure(model: WorldModel, sessions: int, chunks: int, warmup: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    graphs = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    step = stepper(model, sessions)
    first = step()
    sync()
    ttff = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(chunks):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    return {
        "sessions": sessions,
        "time_to_first_frame_s": round(ttff, 4),
        "chunk_ms_p50": round(float(np.percentile(ms, 50)), 2),
        "chunk_ms_p95": round(float(np.percentile(ms, 95)), 2),
        "frames_per_s": round(float(sessions * model.args.frames_per_chunk * chunks / (ms.sum() / 1000)), 2),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "compiles_while_timed": counters["stats"]["unique_graphs"] - graphs,
        "first_chunk": _signal(first[0]),
    }


def _signal(x: np.ndarray) -> np.ndarray:
    """A chunk as float32 around zero: uint8 frames back to [-1, 1], latents as they are."""
    return x.astype(np.float32) / 127.5 - 1 if x.dtype == np.uint8 else x.astype(np.float32)


def sqnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    noise = float(np.mean((x - ref) ** 2))
    return round(float(10 * np.log10(float(np.mean(ref**2)) / noise)), 2) if noise > 0 else float("inf")


def check(
    models: list[str],
    device: torch.device,
    batches: dict[str, list[int]],
    chunks: int,
    warmup: int,
    compiled_models: list[str],
    compile_s: float,
    save,
) -> None:
    """Measure every row, calling `save(plan, rows)` after each (a check stopped by its time limit
    keeps the rows it has). A row that fails records its error and the check goes on. Each model
    runs at the sessions `batches[model]` lists. Models in `compiled_models` also get compiled rows
    (base and W8A8, one session) while fewer than `compile_s` seconds have passed."""
    plan = runtime.plan(device=device).apply()
    dtype = DTYPES[plan.dtype]
    print(f"runtime: {plan.describe()}", flush=True)
    rows, started = [], time.perf_counter()

    def add(row: dict) -> None:
        rows.append(row)
        print(row, flush=True)
        save(plan, rows)

    for name in models:
        t0 = time.perf_counter()
        try:
            base = build(name, str(device), dtype)
            acts = capture_rows(base, RTNConfig().keep_fp)
        except Exception as e:
            add({"model": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        print(f"{name}: built and its activations captured in {time.perf_counter() - t0:.1f} s", flush=True)
        refs: dict[int, np.ndarray] = {}  # the base model's first chunk, by sessions
        model = None
        for mode, bits in [(plan.dtype, None), *MODES.items()]:
            for compiled in (False, True) if name in compiled_models and bits != (4, 8) else (False,):
                if compiled and time.perf_counter() - started > compile_s:
                    continue
                one = None  # frames/s of one session, for the sweep
                for i, sessions in enumerate(batches[name][:1] if compiled else batches[name]):
                    row = {"model": name, "mode": mode, "compiled": compiled, "sessions": sessions}
                    try:
                        with cuda_graphs(compiled and device.type == "cuda"):
                            if i == 0:  # a model of its own for compiled rows (compiling wraps the blocks)
                                model = base if bits is None else quantized(base, bits, acts, dtype)
                                quant, bf16 = weight_bytes(model)
                                if compiled:
                                    model = (copy.deepcopy(base) if bits is None else model).compile_blocks()
                                t0, skips = time.perf_counter(), counters["inductor"]["cudagraph_skips"]
                                stepper(model, 1, seed=99)()  # warm (and compiled), as a server is at load
                                warm_s = time.perf_counter() - t0
                            r = measure(model, sessions, chunks, warmup, device)
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        add(row)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    first = r.pop("first_chunk")
                    if bits is None and not compiled:
                        refs[sessions] = first
                    row.update(r)
                    one = r["frames_per_s"] if sessions == 1 else one
                    row["x_one_session"] = None if one is None else round(r["frames_per_s"] / one, 2)
                    if compiled:  # inductor decides at compile time (the warm-up) which graphs it skips
                        row["warmup_s"] = round(warm_s, 2)
                        if device.type == "cuda":
                            row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
                    same = bits is None and not compiled
                    row["sqnr_vs_base_db"] = None if same or sessions not in refs else sqnr_db(refs[sessions], first)
                    if bits is not None:
                        row["quantized_weight_bytes"], row["bf16_weight_bytes"] = quant, bf16
                        row["bf16_over_quantized"] = round(bf16 / quant, 3)
                    add(row)
                model = None
        base = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cuda_graphs(on: bool):
    """Inductor's CUDA graphs for what compiles inside, as the server turns them on for compiled models on CUDA."""
    if not on:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"triton.cudagraphs": True})


def cudagraph_skips(rows: list[dict]) -> int | None:
    """CUDA graphs inductor skipped in the compiled rows on CUDA, all together (None: no such row).
    Zero expected: each block writes only into the model's batch buffers, static addresses."""
    counts = [r["cudagraph_skips"] for r in rows if "cudagraph_skips" in r]
    return sum(counts) if counts else None


def host() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def markdown(result: dict) -> str:
    cols = [
        ("model", "model"),
        ("mode", "mode"),
        ("compiled", "compiled"),
        ("sessions", "sessions"),
        ("time_to_first_frame_s", "first frame s"),
        ("chunk_ms_p50", "chunk ms p50"),
        ("chunk_ms_p95", "chunk ms p95"),
        ("frames_per_s", "frames/s"),
        ("x_one_session", "x 1 session"),
        ("peak_memory_bytes", "peak MiB"),
        ("bf16_over_quantized", "bf16 / quantized weights"),
        ("sqnr_vs_base_db", "SQNR vs base dB"),
        ("warmup_s", "warm-up s"),
        ("compiles_while_timed", "compiles timed"),
        ("cudagraph_skips", "CUDA graphs skipped"),
        ("error", "error"),
    ]
    skips = result["cudagraph_skips"]
    lines = [
        f"# Device check: {result['device']}",
        "",
        f"`{result['command']}`; runtime: {result['plan']}; host: {json.dumps(result['host'])}",
        "",
        "CUDA graphs skipped in compiled rows: "
        + ("no compiled CUDA row" if skips is None else f"{skips} ({'pass' if skips == 0 else 'FAIL'}: 0 expected)"),
        "",
        "| " + " | ".join(title for _, title in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in result["rows"]:
        cells = []
        for key, _ in cols:
            v = row.get(key)
            if key == "peak_memory_bytes" and v is not None:
                v = round(v / 2**20)
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--cpu", action="store_true", help="the CPU part: tiny-world, 1 and 2 sessions, few chunks")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--chunks", type=int, default=None, help="timed chunks per row")
    ap.add_argument("--compiled-models", nargs="*", default=["wan2.1-1.3b-causal"], help="also timed compiled")
    ap.add_argument("--compile-budget-s", type=float, default=200.0, help="no compiled rows started past this")
    a = ap.parse_args()
    device = runtime.resolve_device("cpu" if a.cpu else "auto")
    cpu = device.type == "cpu"
    models = a.models or (["tiny-world"] if cpu else ["tiny-world", "small-world", "wan2.1-1.3b-causal"])
    if cpu:  # a smoke run: one thread, so that it does not fight whatever else runs on the host
        torch.set_num_threads(1)
    # On a GPU: the window filled before timing, and small-world swept to where more sessions stop paying.
    warmup = 0 if cpu else 8
    batches = {m: [1, 2] if cpu else SWEEP if m == "small-world" else [1, 4] for m in models}
    chunks = a.chunks or (1 if cpu else 8)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / ("device_check_cpu" if cpu else "device_check")

    def save(plan: runtime.Plan, rows: list[dict]) -> None:
        result = {
            "device": str(device) if cpu else f"{device} ({torch.cuda.get_device_name(device)})",
            "command": "python benchmarks/device_check.py " + " ".join(sys.argv[1:]),
            "plan": plan.describe(),
            "host": host(),
            "chunks": chunks,
            "warmup_chunks": warmup,
            "rows": rows,
            "cudagraph_skips": cudagraph_skips(rows),
        }
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(result))

    compiled = [] if cpu else a.compiled_models  # compiling on a CPU takes minutes
    check(models, device, batches, chunks, warmup, compiled, a.compile_budget_s, save)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
