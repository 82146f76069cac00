"""Bare GEMM speed at the world models' shapes: torch._int_mm and oneDNN int8 vs bf16 and fp32 linear.

Explains the deploy-mode table: how much an integer GEMM can win before any quantize or
rescale pass, per layer shape (M tokens x K in x N out), on this machine's kernels. "int8"
is `_int_mm` on the direct problem, "int8 transposed" the same kernel on (W a^T)^T, and
"qarvd int8" what deploy mode runs (`kernels.int_mm`, which picks between the two).

    python benchmarks/gemm_shapes.py --out benchmarks/results/gemm_shapes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qarvd_core.quant.kernels import int_mm

# (M, K, N): tiny-world attention and FFN layers at batch 1 and 4, small-world's FFN.
SHAPES = [
    (192, 256, 256),
    (192, 256, 1024),
    (192, 1024, 256),
    (768, 256, 1024),
    (192, 512, 512),
    (192, 512, 2048),
    (192, 2048, 512),
]


def micros(fn, *args, repeats: int = 200) -> float:
    for _ in range(10):
        fn(*args)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - t0) / repeats * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gemm_shapes"))
    a = ap.parse_args()
    rows = []
    for M, K, N in SHAPES:
        g = torch.Generator().manual_seed(0)
        a8 = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
        w8 = torch.randint(-127, 128, (K, N), dtype=torch.int8, generator=g)
        w8_nk = w8.t().contiguous()  # the layout deploy mode stores: [N, K]
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        xb, wb = x.bfloat16(), w.bfloat16()
        # oneDNN's int8 linear on a weight prepacked once, rescale fused into its bf16 output.
        packed = torch.ops.onednn.qlinear_prepack(w8_nk, [M, K])
        ws, wz = torch.full((N,), 0.01), torch.zeros(N, dtype=torch.long)
        r = {
            "shape": [M, K, N],
            "int8_us": micros(torch._int_mm, a8, w8),
            "int8_transposed_us": micros(lambda a, w: torch._int_mm(w, a.t()).t(), a8, w8_nk),
            "qarvd_int8_us": micros(int_mm, a8, w8_nk),
            "onednn_int8_us": micros(
                torch.ops.onednn.qlinear_pointwise,
                a8,
                0.02,
                0,
                packed,
                ws,
                wz,
                None,
                1.0,
                0,
                torch.bfloat16,
                "none",
                [],
                "",
            ),
            "bf16_us": micros(F.linear, xb, wb),
            "fp32_us": micros(F.linear, x, w),
        }
        rows.append(r)
        print(r, flush=True)
    md = [
        f"# Bare GEMMs ({torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        "| M x K x N | int8 us | int8 transposed us | qarvd int8 us | oneDNN int8 us | bf16 us | fp32 us | "
        "bf16 / int8 | bf16 / qarvd int8 | bf16 / oneDNN int8 | fp32 / qarvd int8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ] + [
        f"| {' x '.join(map(str, r['shape']))} | {r['int8_us']:.0f} | {r['int8_transposed_us']:.0f} | "
        f"{r['qarvd_int8_us']:.0f} | {r['onednn_int8_us']:.0f} | {r['bf16_us']:.0f} | {r['fp32_us']:.0f} | "
        f"{r['bf16_us'] / r['int8_us']:.2f} | {r['bf16_us'] / r['qarvd_int8_us']:.2f} | "
        f"{r['bf16_us'] / r['onednn_int8_us']:.2f} | {r['fp32_us'] / r['qarvd_int8_us']:.2f} |"
        for r in rows
    ]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
