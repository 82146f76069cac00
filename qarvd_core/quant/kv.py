"""Quantized KV-cache storage: int8 or packed int4 keys and values, one scale per token and head.

A committed chunk's keys (after RoPE) and values are quantized symmetrically over each head's
vector: codes round(x / s) with s = max |x| / qmax, stored as int8 (or two 4-bit codes per byte)
with s in float16. By default each vector is first multiplied by an orthonormal Hadamard matrix
H (QuaRot's rotation, undone when read: x = (x H) H^T): a few large channels, which the keys of
qk-normed heads have, are spread over all of them, so one scale per vector loses far less.

Precision is frame-aware (`KVQuantConfig`): each committed chunk is stored at its own bits, the
sink chunks (which the whole stream attends to) at `sink_bits`, the rolling window at
`window_bits`, and any chunk named in `chunk_bits` at its own; the chunk sensitivity that picks
them is `qarvd_core.quant.analysis.kv_chunk_sensitivity`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qarvd_core.quant.linear import pack_int4, unpack_int4
from qarvd_core.quant.primitives import QuantSpec, quantize

KV_BITS = (4, 8)
# Smallest stored scale: float16's smallest normal number. A token whose entries are all below
# qmax times it (about 0.008 at int8) is stored with this coarser step, an error under 3e-5.
_MIN_SCALE = 2.0**-14


def _normal_bits(bits: int | None) -> int | None:
    if bits in (None, 16):
        return None
    if bits not in KV_BITS:
        raise ValueError(f"KV-cache bits must be 4, 8 or 16 (full precision), got {bits}")
    return bits


@dataclass(frozen=True)
class KVQuantConfig:
    """Bits of the cached keys and values: `sink_bits` for the sink chunks, `window_bits` for the
    rolling window, `chunk_bits` ({chunk number: bits}) for particular committed chunks, over
    their part's; None (or 16) keeps a chunk in the model's dtype. A chunk keeps its bits as the
    window rolls."""

    sink_bits: int | None = 8
    window_bits: int | None = 8
    rotate: bool = True  # Hadamard-rotate each head's vector before quantizing it
    chunk_bits: tuple[tuple[int, int | None], ...] = ()  # given as a dict or pairs, kept sorted

    def __post_init__(self):
        object.__setattr__(self, "sink_bits", _normal_bits(self.sink_bits))
        object.__setattr__(self, "window_bits", _normal_bits(self.window_bits))
        pairs = dict(self.chunk_bits)
        if any(not isinstance(c, int) or c < 0 for c in pairs):
            raise ValueError(f"chunk_bits takes chunk numbers >= 0, got {sorted(pairs)}")
        object.__setattr__(self, "chunk_bits", tuple(sorted((c, _normal_bits(b)) for c, b in pairs.items())))

    @property
    def enabled(self) -> bool:
        return any(b is not None for b in (self.sink_bits, self.window_bits, *dict(self.chunk_bits).values()))

    def bits_of(self, chunk: int, sink_chunks: int) -> int | None:
        """Bits of committed chunk number `chunk` (the first `sink_chunks` are the sink)."""
        over = dict(self.chunk_bits)
        if chunk in over:
            return over[chunk]
        return self.sink_bits if chunk < sink_chunks else self.window_bits

    @classmethod
    def parse(cls, text: str) -> KVQuantConfig:
        """'8' (sink and window at 8 bits), '8,4' (sink 8, window 4), '16' (full precision) or
        'auto' (`AUTO`)."""
        if text == "auto":
            return AUTO
        try:
            parts = [int(p) for p in text.split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2):
            raise ValueError(f"--kv-bits takes BITS, SINK_BITS,WINDOW_BITS or auto, got {text!r}")
        return cls(parts[0], parts[-1])

    def to_dict(self) -> dict:
        d = {"sink_bits": self.sink_bits, "window_bits": self.window_bits, "rotate": self.rotate}
        return d | ({"chunk_bits": [list(p) for p in self.chunk_bits]} if self.chunk_bits else {})

    @classmethod
    def from_dict(cls, d: dict) -> KVQuantConfig:
        known = {"sink_bits", "window_bits", "rotate", "chunk_bits"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown KV-cache settings {sorted(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(map(tuple, v)) if k == "chunk_bits" else v for k, v in d.items()})

    def describe(self) -> str:
        if not self.enabled:
            return "full precision"
        chunks = "".join(f",chunk {c}:{b or 16}" for c, b in self.chunk_bits)
        return f"{self.sink_bits or 16},{self.window_bits or 16}{chunks}"


# The measured trade-off (benchmarks/kv_cache.py): the sink chunk, whose cache moves the final
# frames far more than any window chunk's, at 8 bits; the window at 4; both rotated.
AUTO = KVQuantConfig(8, 4)


@functools.cache
def hadamard(n: int) -> Tensor:
    """The orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two), float32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"the KV-cache rotation needs a power-of-two head_dim, got {n}; use rotate=False")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / n**0.5


def quantize_tokens(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """x [..., hd] -> (codes, scale [..., 1] float16): int8 codes [..., hd], or for 4 bits two
    codes per byte, uint8 [..., hd / 2]. |x - dequantize| <= scale / 2 elementwise."""
    spec = QuantSpec(bits, symmetric=True)
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / spec.qmax).clamp_min(_MIN_SCALE).half()
    # Quantize with the stored scale, so the bound holds for what is read back (its float16
    # rounding moves max |x| / scale by under 0.1 %: no code clips).
    codes = quantize(xf, scale.float(), 0.0, spec).to(torch.int8)
    if bits == 4:
        codes = pack_int4(codes.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
    return codes, scale


def dequantize_tokens(codes: Tensor, scale: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    """Inverse of `quantize_tokens`, in `dtype`."""
    if bits == 4:
        hd = 2 * codes.shape[-1]
        codes = unpack_int4(codes.reshape(-1, codes.shape[-1]), hd).view(*codes.shape[:-1], hd)
    return (codes.float() * scale.float()).to(dtype)


def _unpack_int4_float(packed: Tensor) -> Tensor:
    """uint8 [..., hd / 2], two signed codes a byte (low nibble first) -> float [..., hd].

    Arithmetic shifts of the bytes as int8 sign-extend each nibble: two elementwise ops written
    straight into the float result, several times faster than unpacking through a lookup table
    (this runs for every held chunk on every denoising pass)."""
    s = packed.view(torch.int8)
    out = torch.empty(*s.shape, 2, device=s.device)
    out[..., 0] = (s << 4) >> 4
    out[..., 1] = s >> 4
    return out.flatten(-2)


def read_into(out: Tensor, stores: Sequence[TokenStore], layer: int, mixes: Sequence[Tensor | None]) -> None:
    """`layer`'s tokens of chunks `stores` (all at the same bits), each right-multiplied by its
    matrix `mixes[c]` [hd, hd] (None: the identity), into out [batch, heads, len(stores) * n, hd].

    One pass for all of them, in a handful of ops (an attention layer reads every held chunk on
    every denoising pass): a store's inverse rotation, and any other linear map of a chunk's vectors
    (a rolled chunk's RoPE back in time), is one matmul, and the per-vector scale commutes with it.
    """
    first, n = stores[0], len(stores)
    B, H, _, hd = out.shape
    held = [torch.stack([s.tensors[j][layer] for s in stores], 2) for j in range(len(first.tensors))]
    if first.bits is None:
        x, scale = held[0].float(), None
    elif first.bits == 4:
        x, scale = _unpack_int4_float(held[0]), held[1]
    else:
        x, scale = held[0].float(), held[1]
    if all(m is mixes[0] for m in mixes):  # one matrix for all (`mixes` reuses its tensors): one GEMM
        x = x if mixes[0] is None else x @ mixes[0]
    else:
        eye = torch.eye(hd, device=out.device)
        x = x @ torch.stack([eye if m is None else m for m in mixes])
    view = out.unflatten(2, (n, -1))
    if scale is None:
        view.copy_(x)
    else:
        torch.mul(x, scale, out=view)


class TokenStore:
    """One chunk's tokens [layers, batch, heads, n, hd] at `bits` (None: in `dtype`), written and
    read a layer at a time; with `rotate`, quantized in a Hadamard-rotated basis."""

    def __init__(self, shape: tuple[int, ...], bits: int | None, device, dtype: torch.dtype, rotate: bool = False):
        self.bits, self.dtype = bits, dtype
        *lead, hd = shape
        self.rotation = hadamard(hd).to(device) if rotate and bits is not None else None
        if bits is None:
            self.tensors = [torch.zeros(shape, device=device, dtype=dtype)]
        else:
            code_dim = hd // 2 if bits == 4 else hd
            code_dtype = torch.uint8 if bits == 4 else torch.int8
            self.tensors = [
                torch.zeros(*lead, code_dim, device=device, dtype=code_dtype),
                torch.ones(*lead, 1, device=device, dtype=torch.float16),
            ]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def write(self, layer: int, x: Tensor, rotated: bool = False) -> None:
        """Store x [batch, heads, n, hd] as `layer`'s tokens (`rotated`: already in the rotated basis)."""
        if self.rotation is not None and not rotated:
            x = x.float() @ self.rotation
        parts = [x.to(self.dtype)] if self.bits is None else quantize_tokens(x, self.bits)
        for t, p in zip(self.tensors, parts):
            t[layer] = p

    def read(self, layer: int) -> Tensor:
        """`layer`'s tokens [batch, heads, n, hd] in `dtype`."""
        held = [t[layer] for t in self.tensors]
        if self.bits is None:
            return held[0]
        if self.rotation is None:
            return dequantize_tokens(*held, self.bits, self.dtype)
        return (dequantize_tokens(*held, self.bits, torch.float32) @ self.rotation.T).to(self.dtype)

    def copy_rows(self, other: TokenStore, src_rows: slice, dst_rows: slice) -> None:
        for t, o in zip(self.tensors, other.tensors, strict=True):
            t[:, dst_rows] = o[:, src_rows]
