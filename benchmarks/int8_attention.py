"""Can attention run faster in int8 than in bf16 on this CPU? At the world models' shapes.

The linear layers are only about a quarter of a compiled BF16 chunk, so a W8A8 model can
stream 1.2x faster than BF16 only if attention gets faster too. This measures the candidates
against what the models run now (bf16 `scaled_dot_product_attention`, the flash kernel):

- "int8 QK": SageAttention's recipe (Q and K int8 per token, K smoothed by its mean over
  tokens, P and V stay bf16), Q K^T through `torch._int_mm` one head at a time (it takes 2-D
  inputs only, and `torch.bmm` on int8 sums in int8), softmax and P V compiled by inductor;
- "int8 QK + PV": the same with P (scaled per row) and V (per channel) int8 too;
- torchao's int8 attention op (`torch.ops.torchao.qscaled_dot_product`), where the installed
  wheel has a CPU kernel for it.

Times are per call, one query chunk against the whole window (sink + window + itself);
SQNR is against fp32 attention on the same inputs.

    python benchmarks/int8_attention.py --out benchmarks/results/int8_attention
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from qarvd_core.model import ModelArgs


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> int8 codes and one symmetric scale per row [..., 1]."""
    s = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
    return torch.round(x / s).to(torch.int8), s


def _per_head_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, H, M, K] int8 times b [B, H, N, K] int8, transposed: int32 [B, H, M, N], one head at a time."""
    B, H = a.shape[:2]
    acc = torch.stack([torch._int_mm(a[i, h], b[i, h].t()) for i in range(B) for h in range(H)])
    return acc.view(B, H, *acc.shape[1:])


def int8_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) with Q K^T in int8: [B, H, L, S] fp32."""
    k = k - k.mean(-2, keepdim=True)  # softmax ignores a per-query constant; this shrinks K's range
    qi, sq = _int8_rows(q.float())
    ki, sk = _int8_rows(k.float())
    scores = _per_head_int_mm(qi, ki).float() * (sq * sk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)


def int8_qk(q, k, v, mask):
    return (int8_probs(q, k, mask).to(v.dtype) @ v).to(q.dtype)


def int8_qk_pv(q, k, v, mask):
    pi, sp = _int8_rows(int8_probs(q, k, mask))  # per-row scale: a row's largest probability maps to 127
    vi, sv = _int8_rows(v.float().transpose(-1, -2))  # per channel of V
    return (_per_head_int_mm(pi, vi).float() * sp * sv.transpose(-1, -2)).to(q.dtype)


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def torchao_status() -> str:
    """Whether torchao's int8 attention op runs on CPU here (it is registered without a CPU kernel in 0.18)."""
    try:
        import torchao.ops  # noqa: F401  (registers the op)

        u8 = torch.zeros(1, 1, 32, 64, dtype=torch.uint8)
        torch.ops.torchao.qscaled_dot_product(u8, u8, u8, None, 0.0, False, None, *([1.0, 0] * 5))
        return "runs"
    except (ImportError, AttributeError, NotImplementedError) as e:  # no torchao / no op / no CPU kernel
        return f"unavailable ({type(e).__name__}: {str(e).split('. ')[0]})"


def micros(fn, *args) -> float:
    """Median time per call in microseconds (torch's timer: warm-up, then blocks of calls)."""
    fn(*args)  # compiles a compiled candidate outside the timing
    timer = Timer("fn(*args)", globals={"fn": fn, "args": args}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=1.0).median * 1e6


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-world", "small-world"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_attention"))
    a = ap.parse_args()
    candidates = {
        "bf16 SDPA": sdpa,
        "bf16 SDPA compiled": torch.compile(sdpa),
        "int8 QK (compiled)": torch.compile(int8_qk),
        "int8 QK + PV (compiled)": torch.compile(int8_qk_pv),
    }
    rows = []
    for name in a.models:
        args = ModelArgs.from_name(name)
        H, D, L = args.n_heads, args.head_dim, args.chunk_tokens
        S = L * args.context_chunks
        g = torch.Generator().manual_seed(0)
        # RMS-normed queries and keys (as the model's norm_q / norm_k make them) and unit values.
        q, k, v = (torch.randn(1, H, n, D, generator=g) for n in (L, S, S))
        mask = torch.ones(L, S, dtype=torch.bool)
        ref = sdpa(q, k, v, mask)
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        base = micros(sdpa, qb, kb, vb, mask)
        for cand, fn in candidates.items():
            us = base if cand == "bf16 SDPA" else micros(fn, qb, kb, vb, mask)
            r = {"model": name, "shape": [H, L, S, D], "variant": cand, "us": us, "x_bf16_sdpa": base / us}
            r["sqnr_db"] = sqnr_db(ref, fn(qb, kb, vb, mask))
            rows.append(r)
            print(r, flush=True)
    status = torchao_status()
    md = [
        f"# Attention in int8 vs bf16 ({torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        f"torchao's int8 attention op on CPU: {status}.",
        "",
        "| model | heads x queries x keys x head dim | variant | us per call | x bf16 SDPA | SQNR dB vs fp32 |",
        "|---|---|---|---|---|---|",
    ] + [
        f"| {r['model']} | {' x '.join(map(str, r['shape']))} | {r['variant']} | {r['us']:.0f} | "
        f"{r['x_bf16_sdpa']:.2f} | {r['sqnr_db']:.1f} |"
        for r in rows
    ]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "torchao_op": status}
    a.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
