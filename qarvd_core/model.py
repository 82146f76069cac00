"""A Wan-style block-causal video diffusion transformer, in one file.

Key names follow Wan 2.1 (`blocks.N.self_attn.q`, `blocks.N.ffn.0`, `head.head`, ...) so that
real Self-Forcing / CausVid checkpoints map 1:1. Generation is chunk by chunk: tokens of chunk
k attend to chunks <= k, earlier chunks come from a per-layer KV cache (keys stored after
RoPE), and the cache rolls: `sink_chunks` first chunks are kept forever, then a window of
`window_chunks`. When the window rolls, the kept keys are rotated back in time so that RoPE
time positions never grow, however long the stream runs (or, with `absolute_time`, keep the
absolute positions Wan's causal models give them).

With `camera_rope`, the spatial RoPE positions are world positions rather than screen
positions: each frame's (h, w) grid is shifted by the camera position, integrated from the
commanded actions. A place seen before keeps its position when the camera comes back, so
recalling it from the cache is attention at zero spatial offset, whatever the path between.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qarvd_core.world.simulator import ACTION_MOTION, ACTIONS, BIOME_NAMES

if TYPE_CHECKING:
    from qarvd_core.quant.kv import KVQuantConfig, TokenStore


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 4
    ffn_dim: int = 1024
    in_channels: int = 3
    patch_size: int = 8
    frame_height: int = 64  # in pixels (tiny presets) or latent cells (Wan)
    frame_width: int = 64
    frames_per_chunk: int = 3
    freq_dim: int = 256
    text_dim: int = 256
    text_len: int = 4
    n_prompts: int = len(BIOME_NAMES)  # 0: prompt embeddings come from an external text encoder
    n_actions: int = len(ACTIONS)  # 0: no action conditioning
    window_chunks: int = 3
    sink_chunks: int = 1
    rope_theta: float = 10000.0
    eps: float = 1e-6
    camera_rope: bool = False  # spatial RoPE positions follow the camera (world, not screen, positions)
    # How the head's output and the time input are read. The tiny presets predict x0 with each
    # patch's outputs channel-major and clamp x0 to the [-1, 1] pixel range; Wan checkpoints
    # predict flow velocity with channels last in each patch, build the timestep sinusoid in
    # float64 and work in an unbounded latent space.
    prediction: str = "x0"  # "x0", or "flow": the head predicts v and x0 = x_t - t * v
    patch_channels_last: bool = False  # a patch's outputs are (ph, pw, C) (Wan) rather than (C, ph, pw)
    fp64_timestep: bool = False  # the timestep sinusoid in float64, as Wan builds it
    clamp_x0: bool = True  # clamp predicted x0 to [-1, 1] while sampling (pixel space)
    # RoPE time positions of a rolling cache. The tiny presets rotate rolled window keys back in
    # time, so positions stay bounded however long a stream runs; Wan's causal models (Self-Forcing,
    # CausVid, LongLive) rope every frame at its absolute index and never move a cached key.
    absolute_time: bool = False

    def __post_init__(self):
        if self.camera_rope and not self.n_actions:
            raise ValueError("camera_rope needs actions (n_actions > 0): the camera is integrated from them")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.frame_height % self.patch_size or self.frame_width % self.patch_size:
            raise ValueError("frame size must be a multiple of patch_size")
        if self.prediction not in ("x0", "flow"):
            raise ValueError(f"prediction must be 'x0' or 'flow', got {self.prediction!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def grid(self) -> tuple[int, int]:
        return self.frame_height // self.patch_size, self.frame_width // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def chunk_tokens(self) -> int:
        return self.tokens_per_frame * self.frames_per_chunk

    @property
    def context_chunks(self) -> int:
        """Chunks a query can see at most: sink + window + itself; train on clips this long."""
        return self.sink_chunks + self.window_chunks + 1

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS: dict[str, dict] = {
    "tiny-world": dict(dim=256, n_layers=6, n_heads=4, ffn_dim=1024, camera_rope=True),
    "small-world": dict(dim=512, n_layers=8, n_heads=8, ffn_dim=2048),
    # The Self-Forcing / CausVid layout (Wan 2.1 T2V 1.3B, causal); 480x832 video -> 60x104 latents.
    "wan2.1-1.3b-causal": dict(
        dim=1536,
        n_layers=30,
        n_heads=12,
        ffn_dim=8960,
        in_channels=16,
        patch_size=2,
        frame_height=60,
        frame_width=104,
        text_dim=4096,
        text_len=512,
        n_prompts=0,
        n_actions=0,
        window_chunks=6,
        sink_chunks=1,
        prediction="flow",
        patch_channels_last=True,
        fp64_timestep=True,
        clamp_x0=False,
        absolute_time=True,
    ),
}


# ----------------------------------------------------------------------------- RoPE


def _axis_angles(positions: Tensor, dim: int, theta: float) -> Tensor:
    """Rotation angles [len(positions), dim // 2] for one axis."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return positions.double()[:, None] * inv


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of a head's dims between the (time, height, width) axes."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


# Camera motion of each action in patches, (dx, dy): the tiny presets' world moves one tile,
# which is one patch, per frame.
ACTION_SHIFT = torch.tensor([ACTION_MOTION[a] for a in ACTIONS])


def camera_path(actions: Tensor, start: Tensor | None = None) -> Tensor:
    """Camera position (x, y) in patches after each frame's action [B, T, 2], from `start` [B, 2]."""
    path = ACTION_SHIFT[actions.cpu()].cumsum(1)
    return path if start is None else path + start[:, None]


def rope_freqs(args: ModelArgs, first_frame: int, T: int, camera: Tensor | None = None) -> Tensor:
    """(cos, sin) [B, T * tokens_per_frame, head_dim // 2, 2] in float64 for frames first_frame .. + T - 1.

    `camera` [B, T, 2] (x, y in patches) shifts each frame's spatial grid to world positions;
    without it the positions are the screen's and B is 1. Angles are computed in float64, so
    world positions far from the start (hours of walking) rotate as exactly as near ones.
    """
    if camera is None:
        return _screen_freqs(args, first_frame, T)
    dt, dh, dw = rope_split(args.head_dim)
    (gh, gw), B = args.grid, camera.shape[0]
    cam = camera.cpu()
    time_ang = _axis_angles(torch.arange(first_frame, first_frame + T), dt, args.rope_theta)
    h_ang = _axis_angles((torch.arange(gh) + cam[..., 1:2]).flatten(), dh, args.rope_theta).view(B, T, gh, -1)
    w_ang = _axis_angles((torch.arange(gw) + cam[..., 0:1]).flatten(), dw, args.rope_theta).view(B, T, gw, -1)
    shape = (B, T, gh, gw, -1)
    ang = torch.cat(
        [
            time_ang[None, :, None, None].expand(shape),
            h_ang[:, :, :, None].expand(shape),
            w_ang[:, :, None].expand(shape),
        ],
        dim=-1,
    ).reshape(B, T * gh * gw, -1)
    return torch.stack([ang.cos(), ang.sin()], dim=-1)


@functools.lru_cache(maxsize=16)
def _screen_freqs(args: ModelArgs, first_frame: int, T: int) -> Tensor:
    # Cached: a rolled cache only ever asks for sink + window + 1 distinct offsets, and an
    # absolute-time one for the same offset on each of a chunk's passes (few entries: each of the
    # 1.3B preset's is 4.8 MB).
    return rope_freqs(args, first_frame, T, torch.zeros(1, T, 2, dtype=torch.long))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and rotations run in: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of x's last dim by angles given as cos/sin [..., last // 2]."""
    xf = x.to(compute_dtype(x.dtype)).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """x [B, L, H, hd] rotated by freqs [B or 1, L, hd/2, 2]."""
    return rotate(x, freqs[:, :, None, :, 0], freqs[:, :, None, :, 1])


# ----------------------------------------------------------------------------- cache


def _static(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """A layer's key and value buffers, marked as static addresses: the blocks write into them in
    place, and inductor's CUDA graphs take only inputs at static addresses as written in place (it
    skips the graph otherwise). Unguarded: a buffer elsewhere re-records the graph, never recompiles."""
    for t in (k, v):
        torch._dynamo.mark_static_address(t, guard=False)
    return k, v


class KVCache:
    """Keys (after RoPE) and values of committed chunks for every layer.

    Holds at most sink + window chunks between steps (plus one slot for the chunk being
    committed). `time_offset` is the RoPE time position of the next chunk's first frame, and
    `camera` [B, 2] the camera position after the last committed frame (for `camera_rope`).

    With `quant` (`KVQuantConfig`) each held chunk is stored quantized at its own bits
    (`KVQuantConfig.bits_of`), one store per held chunk, and nothing else is kept between chunks.
    A pass reads one layer at a time: the layer's held chunks are dequantized into one working
    buffer [B, H, capacity, hd], which every layer reuses, so the full-precision copy is one
    layer's, never the whole cache's. Rolling the window moves stores, not codes, and a rolled
    chunk's keys are rotated back in time when read (`_age`), so rolling adds no quantization
    error. Once the window is full, a commit writes the new chunk over the store of the oldest
    window chunk, a layer at a time after that layer has read it: no store is held for a slot.
    """

    def __init__(
        self,
        args: ModelArgs,
        batch: int,
        device=None,
        dtype=torch.float32,
        quant: KVQuantConfig | None = None,
        buffers: tuple[Tensor, Tensor] | None = None,
    ):
        self.args = args
        self.quant = quant if quant is not None and quant.enabled else None
        self.capacity = args.context_chunks * args.chunk_tokens
        shape = (args.n_layers, batch, args.n_heads, self.capacity, args.head_dim)
        self.dtype = dtype
        # `buffers`: key and value buffers kept by the caller, so that what the blocks write into
        # stays at fixed addresses across chunks (CUDA graphs replay on them): an FP cache's storage
        # `shape`, or a quantized cache's working buffers [1, *shape[1:]] (otherwise allocated while
        # a chunk is made, `_working`).
        self.value_basis: Tensor | None = None  # the basis a pass's values are in (None: their own)
        if self.quant is None:
            self.k, self.v = buffers or (torch.zeros(shape, device=device, dtype=dtype) for _ in "kv")
            self.device = self.k.device
        else:
            self.device = torch.device(device or "cpu")
            self._buffers = None if buffers is None else (buffers[0][0], buffers[1][0])
            self._work: tuple[Tensor, Tensor] | None = self._buffers
            self._chunk_shape = (*shape[:3], args.chunk_tokens, args.head_dim)
            self.chunks: list[tuple[TokenStore, TokenStore]] = []  # (keys, values) stores of the held chunks
            # Chunks each held chunk's keys are to be rotated back in time when read.
            self._age: list[int] = []
            self._commit: tuple[TokenStore, TokenStore] | None = None  # the store a commit writes into
            self._mixes: dict[tuple[bool, int], Tensor | None] = {}  # `_mix`'s matrices
            # Values are read in the stores' rotated basis, and the attention output is rotated back
            # once (`SelfAttention`): a pass then undoes no rotation over the held chunks' values,
            # only over the chunk being made. (Keys cannot: a rolled chunk's shift is its own.)
            from qarvd_core.quant.kv import hadamard  # the quant package imports this module

            self.value_basis = hadamard(args.head_dim).to(self.device) if self.quant.rotate else None
        self.n_chunks = 0  # chunks held now
        self.committed = 0  # chunks ever committed
        self.camera = torch.zeros(batch, 2, dtype=torch.long)
        # Rotating keys back by one chunk in time: applied to the window when it rolls.
        self._t_dims = rope_split(args.head_dim)[0]
        back = _axis_angles(torch.tensor([-args.frames_per_chunk]), self._t_dims, args.rope_theta)[0]
        self._roll_cos, self._roll_sin = back.cos().float().to(device), back.sin().float().to(device)

    @property
    def length(self) -> int:
        return self.n_chunks * self.args.chunk_tokens

    @property
    def time_offset(self) -> int:
        """RoPE time position of the next chunk's first frame: its index among every frame
        committed (`absolute_time`), or after the held ones (rolled keys are rotated back)."""
        chunks = self.committed if self.args.absolute_time else self.n_chunks
        return chunks * self.args.frames_per_chunk

    @property
    def nbytes(self) -> int:
        """Bytes of the stored keys and values (all streams of the batch)."""
        if self.quant is None:
            return self.k.nbytes + self.v.nbytes
        return sum(s.nbytes for pair in self.chunks for s in pair)

    @property
    def full_nbytes(self) -> int:
        """Bytes of the stored keys and values once the window is full, as a stream holds them from
        then on: a quantized cache's stores of the sink and window chunks, at their bits."""
        if self.quant is None:
            return self.nbytes
        from qarvd_core.quant.kv import TokenStore

        a, q = self.args, self.quant
        bits = [q.bits_of(c, a.sink_chunks) for c in range(a.sink_chunks)] + [q.window_bits] * a.window_chunks
        return 2 * sum(TokenStore(self._chunk_shape, b, "meta", self.dtype, q.rotate).nbytes for b in bits)

    def _new_store(self, bits: int | None) -> tuple[TokenStore, TokenStore]:
        from qarvd_core.quant.kv import TokenStore  # the quant package imports this module

        return tuple(TokenStore(self._chunk_shape, bits, self.device, self.dtype, self.quant.rotate) for _ in "kv")

    def view(self, layer: int) -> tuple[Tensor, Tensor]:
        if self.quant is None:
            return self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]
        _, B, H, ct, hd = self._chunk_shape
        k, v = (torch.zeros(B, H, self.length, hd, device=self.device, dtype=self.dtype) for _ in "kv")
        self._read(layer, k, v)
        if self.value_basis is not None:
            v = (v.float() @ self.value_basis.T).to(self.dtype)
        return k, v

    def slot(self) -> tuple[Tensor, Tensor]:
        """Where the next chunk goes and what it may see, as tensors (so one compiled graph fits every
        cache length): token indices [chunk_tokens] of the slot after the held chunks, and the key
        mask [1, capacity] over the whole buffer (held chunks and the slot)."""
        ct, cap = self.args.chunk_tokens, self.capacity
        idx = torch.arange(self.length, self.length + ct, device=self.device)
        return idx, (torch.arange(cap, device=self.device) < self.length + ct)[None]

    def layer(self, i: int, slot: Tensor | None) -> CachedKV:
        """Layer i's key and value buffers [B, H, capacity, hd] for a cached pass, with `slot`."""
        if self.quant is None:  # fresh views each pass (a kept one breaks autograd after a write under grad)
            return *_static(self.k[i], self.v[i]), slot, None
        k, v = self._working()
        for buf in (k, v):  # what earlier layers left past the held chunks, as a fresh buffer would be
            buf[:, :, self.length :].zero_()
        self._read(i, k[:, :, : self.length], v[:, :, : self.length])
        return *_static(k, v), slot, self.value_basis

    def _working(self) -> tuple[Tensor, Tensor]:
        """The working key and value buffers [B, H, capacity, hd]: the caller's, or allocated for
        the chunk being made (freed when it is committed)."""
        if self._work is None:
            _, B, H, _, hd = self._chunk_shape
            self._work = tuple(torch.zeros(B, H, self.capacity, hd, device=self.device, dtype=self.dtype) for _ in "kv")
        return self._work

    def _read(self, i: int, k: Tensor, v: Tensor) -> None:
        """Layer i's held chunks dequantized into k and v [B, H, length, hd]: each run of chunks at
        the same bits in one pass (`read_into`), keys and values by their stores' inverse rotation,
        a rolled window chunk's keys also rotated back in time by its age."""
        from qarvd_core.quant.kv import read_into

        ct, held = self.args.chunk_tokens, self.chunks[: self.n_chunks]
        start = 0
        while start < len(held):
            end = start + 1
            while end < len(held) and held[end][0].bits == held[start][0].bits:
                end += 1
            run = held[start:end]
            for j, buf in enumerate((k, v)):
                if j == 1 and self.value_basis is not None:  # into the basis: nothing to undo where rotated
                    mixes = [None if s[1].rotation is not None else self.value_basis for s in run]
                else:
                    ages = self._age[start:end] if j == 0 else [0] * len(run)
                    mixes = [self._mix(s[j], age) for s, age in zip(run, ages)]
                read_into(buf[:, :, start * ct : end * ct], [s[j] for s in run], i, mixes)
            start = end

    def _mix(self, store: TokenStore, age: int) -> Tensor | None:
        """The matrix a stored chunk's vectors are read back through: the store's inverse rotation,
        then for keys `age` chunks old the RoPE rotation back by as many chunks (None: neither)."""
        key = (store.rotation is not None, age)
        if key not in self._mixes:
            hd = self.args.head_dim
            m = torch.eye(hd, device=self.device)
            if store.rotation is not None:
                m = store.rotation.T.contiguous()
            if age:
                ang = _axis_angles(
                    torch.tensor([-age * self.args.frames_per_chunk]), self._t_dims, self.args.rope_theta
                )
                t = self._t_dims  # rows of the identity, rotated as a key's entries would be
                back = torch.eye(hd, device=self.device)
                back[:, :t] = rotate(
                    back[:, :t], ang[0].cos().float().to(self.device), ang[0].sin().float().to(self.device)
                )
                m = m @ back
            self._mixes[key] = None if not key[0] and not age else m
        return self._mixes[key]

    def store(self, i: int, kv: CachedKV) -> None:
        """Keep what a committing pass wrote into layer i's slot (a quantized cache stores it)."""
        if self.quant is None:
            return  # written in place
        a, ct, n = self.args, self.args.chunk_tokens, self.n_chunks
        if i == 0:  # a commit's first layer: pick the store the chunk goes into, at its bits
            bits = self.quant.bits_of(self.committed, a.sink_chunks)
            full = a.window_chunks and n == a.sink_chunks + a.window_chunks
            oldest = self.chunks[a.sink_chunks] if full else None
            # Over the oldest window chunk's store, which this commit's layers read before writing.
            self._commit = oldest if oldest is not None and oldest[0].bits == bits else self._new_store(bits)
        for j, (store, x) in enumerate(zip(self._commit, kv[:2])):
            x = x[:, :, n * ct : (n + 1) * ct]
            if j == 1 and self.value_basis is not None:  # values in the basis (`layer`)
                if store.rotation is None:  # a full-precision chunk keeps them in their own
                    x = x.float() @ self.value_basis.T
                store.write(i, x, rotated=store.rotation is not None)
            else:
                store.write(i, x)

    def advance(self, camera: Tensor | None = None) -> None:
        """Count the chunk just written (its last frame's camera: `camera`); roll the window if over-full."""
        a, ct = self.args, self.args.chunk_tokens
        if camera is not None:
            self.camera = camera.detach().cpu().clone()
        self.committed += 1
        aging = 0 if a.absolute_time else 1  # absolute positions: keys keep theirs
        if self.quant is not None:
            # The new chunk's store joins the held ones (rewound ones beyond it are dropped); over
            # the window, the oldest window chunk goes and the rest age by one chunk.
            s = a.sink_chunks
            del self.chunks[self.n_chunks :], self._age[self.n_chunks :]
            self.chunks.append(self._commit)
            self._age.append(0)
            self._commit, self._work = None, self._buffers
            self.n_chunks += 1
            if self.n_chunks > s + a.window_chunks:
                del self.chunks[s], self._age[s]
                self._age[s:] = [x + aging for x in self._age[s:]]
                self.n_chunks -= 1
            return
        self.n_chunks += 1
        if self.n_chunks <= a.sink_chunks + a.window_chunks:
            return
        # Drop the oldest window chunk; shift the rest left (and one chunk back in time).
        lo, hi = a.sink_chunks * ct, self.n_chunks * ct
        kept = self.k[:, :, :, lo + ct : hi].clone()
        if aging:
            kept[..., : self._t_dims] = rotate(kept[..., : self._t_dims], self._roll_cos, self._roll_sin)
        self.k[:, :, :, lo : hi - ct] = kept
        self.v[:, :, :, lo : hi - ct] = self.v[:, :, :, lo + ct : hi].clone()
        self.n_chunks -= 1

    def copy_from(self, src: KVCache, src_rows: slice = slice(None), dst_rows: slice = slice(None)) -> None:
        """Copy src's state (keys, values, camera, lengths), all of it: the one place that lists it."""
        if self.quant != src.quant:
            raise ValueError(f"cannot copy a cache quantized as {src.quant} into one quantized as {self.quant}")
        if self.quant is None:
            self.k[:, dst_rows] = src.k[:, src_rows]
            self.v[:, dst_rows] = src.v[:, src_rows]
        else:
            theirs = src.chunks[: src.n_chunks]
            del self.chunks[len(theirs) :]
            for c, pair in enumerate(theirs):
                if c == len(self.chunks):
                    self.chunks.append(self._new_store(pair[0].bits))
                elif self.chunks[c][0].bits != pair[0].bits:  # a chunk_bits chunk in this slot
                    if dst_rows != slice(None):
                        raise ValueError("streams holding chunks at different bits in one slot cannot share a batch")
                    self.chunks[c] = self._new_store(pair[0].bits)
                for m, t in zip(self.chunks[c], pair):
                    m.copy_rows(t, src_rows, dst_rows)
            self._age = src._age[: src.n_chunks]
        self.camera[dst_rows] = src.camera[src_rows]
        self.n_chunks, self.committed = src.n_chunks, src.committed

    def reset(self) -> None:
        self.n_chunks = 0
        self.committed = 0
        self.camera.zero_()
        if self.quant is not None:
            self.chunks.clear()
            self._age.clear()

    def rewind(self, keep: int) -> None:
        """Hold only the first `keep` chunks, to re-commit the others (a prompt switch); `committed`
        is left to the caller, which sets it to each re-committed chunk's number."""
        self.n_chunks = min(keep, self.n_chunks)


# ----------------------------------------------------------------------------- layers

# One layer's view of the cache for a cached pass: key and value buffers [B, H, capacity, hd]
# the token indices [chunk_tokens] of the slot the current chunk is written to, and the basis
# [hd, hd] the value buffer is in (None: the values' own; `KVCache.value_basis`).
CachedKV = tuple[Tensor, Tensor, Tensor, Tensor | None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(compute_dtype(x.dtype))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Wan's attention projections: q, k, v, o with RMSNorm on q and k over the whole width."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.q = nn.Linear(args.dim, args.dim)
        self.k = nn.Linear(args.dim, args.dim)
        self.v = nn.Linear(args.dim, args.dim)
        self.o = nn.Linear(args.dim, args.dim)
        self.norm_q = RMSNorm(args.dim, args.eps)
        self.norm_k = RMSNorm(args.dim, args.eps)


class SelfAttention(Attention):
    def forward(self, x: Tensor, freqs: Tensor, mask: Tensor | None, kv: CachedKV | None):
        B, L, D = x.shape
        q = apply_rope(self.norm_q(self.q(x)).view(B, L, self.n_heads, self.head_dim), freqs).transpose(1, 2)
        k = apply_rope(self.norm_k(self.k(x)).view(B, L, self.n_heads, self.head_dim), freqs).transpose(1, 2)
        v = self.v(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        basis = None
        if kv is not None:
            # The chunk's keys go into the slot after the held chunks (a commit keeps them there,
            # a denoising pass leaves them to be overwritten); the query sees the buffer masked.
            k_buf, v_buf, slot, basis = kv
            if basis is not None:
                v = v @ basis.to(v.dtype)
            k_buf.index_copy_(2, slot, k.to(k_buf.dtype))
            v_buf.index_copy_(2, slot, v.to(v_buf.dtype))
            k, v = k_buf.to(q.dtype), v_buf.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L, hd]
        if basis is not None:  # weighted sums of values in that basis: back
            y = y @ basis.T.to(y.dtype)
        return self.o(y.transpose(1, 2).reshape(B, L, D))


class CrossAttention(Attention):
    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, L, D = x.shape
        q = self.norm_q(self.q(x)).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.norm_k(self.k(context)).view(B, -1, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v(context).view(B, -1, self.n_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, L, D))


class TanhGELU(nn.Module):
    """GELU, tanh approximation (Wan's FFN).

    Compiled, it is written as x * sigmoid(2u), the same function since 0.5 (1 + tanh u) =
    sigmoid(2u): on CPU, inductor's vectorised tanh is several times slower than its sigmoid,
    and the FFN activation is the largest elementwise op of a compiled block.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        return F.gelu(x, approximate="tanh")


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm1 = nn.LayerNorm(args.dim, args.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(args)
        self.norm3 = nn.LayerNorm(args.dim, args.eps)
        self.cross_attn = CrossAttention(args)
        self.norm2 = nn.LayerNorm(args.dim, args.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(args.dim, args.ffn_dim), TanhGELU(), nn.Linear(args.ffn_dim, args.dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, args.dim))

    def forward(self, x, e0, context, freqs, mask, kv: CachedKV | None = None):
        # x [B, T*N, D]; e0 [B, T, 6, D]: one adaLN modulation per frame, shared by its N tokens.
        B, L, D = x.shape
        T = e0.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation[:, None] + e0).unsqueeze(3).unbind(2)

        def modulate(h, shift, scale):
            return (h.view(B, T, -1, D) * (1 + scale) + shift).view(B, L, D)

        def gated(h, gate):
            return (h.view(B, T, -1, D) * gate).view(B, L, D)

        y = self.self_attn(modulate(self.norm1(x), shift1, scale1), freqs, mask, kv)
        x = x + gated(y, gate1)
        x = x + self.cross_attn(self.norm3(x), context)
        y = self.ffn(modulate(self.norm2(x), shift2, scale2))
        return x + gated(y, gate2)


class Head(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = nn.LayerNorm(args.dim, args.eps, elementwise_affine=False)
        self.head = nn.Linear(args.dim, args.in_channels * args.patch_size**2)
        self.modulation = nn.Parameter(torch.zeros(1, 2, args.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        B, L, D = x.shape
        T = e.shape[1]
        shift, scale = (self.modulation[:, None] + e[:, :, None]).unsqueeze(3).unbind(2)  # [B, T, 1, D]
        return self.head((self.norm(x).view(B, T, -1, D) * (1 + scale) + shift).view(B, L, D))


def timestep_embedding(t: Tensor, dim: int, fp64: bool = False) -> Tensor:
    """Sinusoidal embedding [cos, sin] of flow time t in [0, 1] at Wan's timestep 1000 t.

    The timestep is computed in float32, as a FlowMatch scheduler's `sigmas * 1000`; `fp64`
    then builds the sinusoid in float64 like Wan (angles up to 1000 rad lose ~1e-4 in float32).
    """
    half = dim // 2
    steps = t.float() * 1000
    if fp64:
        freqs = torch.pow(10000, -torch.arange(half, device=t.device, dtype=torch.float64) / half)
        args = steps.double()[..., None] * freqs
    else:
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = steps[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def compile_inference(fn, max_autotune: bool = False):
    """torch.compile `fn` (static shapes) for inference, as `WorldModel.compile_blocks` does.

    `max_autotune`: inductor's freezing and its C++ GEMM templates. Weights become constants, so
    GEMMs run as AMX micro-kernels with the ops around them fused into their epilogues, where
    autotuning finds that faster than ATen's kernels. Dynamo reads the freezing flag when it
    traces (the first call and any recompile) to make the weights constants guarded by
    identity, so the flag is switched on around the calls rather than process-wide.
    """
    if not max_autotune:
        return torch.compile(fn, dynamic=False)
    import torch._inductor.config as inductor_config

    options = {
        "max_autotune": True,
        "max_autotune_gemm_backends": "CPP,ATEN",
        # Quiet: without these, every GEMM's autotuning table is written to stderr.
        "autotune_num_choices_displayed": 0,
        "max_autotune_report_choices_stats": False,
    }
    compiled = torch.compile(fn, dynamic=False, options=options)

    def call(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return call


# ----------------------------------------------------------------------------- model


class WorldModel(nn.Module):
    """Predicts clean frames x0 from noisy frames x_t, per-frame flow times, actions and a prompt."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        p = args.patch_size
        self.patch_embedding = nn.Conv3d(args.in_channels, args.dim, kernel_size=(1, p, p), stride=(1, p, p))
        self.text_embedding = nn.Sequential(
            nn.Linear(args.text_dim, args.dim), nn.GELU(approximate="tanh"), nn.Linear(args.dim, args.dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(args.freq_dim, args.dim), nn.SiLU(), nn.Linear(args.dim, args.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(args.dim, 6 * args.dim))
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.head = Head(args)
        self.kv_quant: KVQuantConfig | None = None  # how streams of this model store their KV cache
        # Scene prompts of the tiny presets are learned token sequences (one per biome);
        # the Wan preset takes text-encoder embeddings instead.
        if args.n_prompts:
            self.prompt_encoder = nn.Embedding(args.n_prompts, args.text_len * args.text_dim)
        if args.n_actions:
            self.action_embedding = nn.Embedding(args.n_actions, args.dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.5)
        # adaLN-zero: every block starts as the identity and the head predicts zeros.
        nn.init.zeros_(self.time_projection[1].weight)
        nn.init.zeros_(self.head.head.weight)

    # Conditioning -------------------------------------------------------------

    def encode_prompt(self, prompt_ids: Tensor) -> Tensor:
        """Biome ids [B] -> cross-attention context [B, text_len, dim]."""
        a = self.args
        return self.embed_text(self.prompt_encoder(prompt_ids).view(-1, a.text_len, a.text_dim))

    def embed_text(self, text: Tensor) -> Tensor:
        """Text-encoder states [B, text_len, text_dim] (Wan: UMT5, zeros past the prompt) -> context."""
        return self.text_embedding(text)

    def _frame_embedding(self, t: Tensor, actions: Tensor | None) -> Tensor:
        a = self.args
        sinusoid = timestep_embedding(t, a.freq_dim, a.fp64_timestep)
        e = self.time_embedding(sinusoid.to(self.patch_embedding.weight.dtype))
        if actions is not None and self.args.n_actions:
            # Actions drive the per-frame adaLN directly: frame i is generated under action i.
            e = e + self.action_embedding(actions)
        return e  # [B, T, D]

    def compile_blocks(self, max_autotune: bool = False) -> WorldModel:
        """torch.compile the transformer blocks for inference; returns self.

        The blocks hold almost all the time, and at these sizes much of it is elementwise work
        (norms, RoPE, adaLN modulation, activation quantization) that eager mode runs one op
        at a time. Every block has the same code and a cached pass has static shapes (the cache
        is attended as a masked buffer), so one graph per batch size serves all blocks and
        cache lengths. Quantized layers should be in their final mode first.

        `max_autotune` (`compile_inference`): frozen weights and AMX GEMM templates; deploy-mode
        int8 layers switch to oneDNN's int8 linear, which inductor fuses the same way. Faster
        streams, at the price of a compile several times longer and one graph per block.
        """
        # All models share Block.forward's code, and each (model, batch size, frozen block) is one
        # entry in its compile cache: raise the default limit of 8 so a server's models stay compiled,
        # and give every compiled model its share of the process-wide cap (256 entries by default;
        # past it, dynamo silently runs the blocks eagerly).
        limit = 64 * (len(self.blocks) if max_autotune else 1)
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
        dynamo_config.accumulated_recompile_limit += limit
        for m in self.modules():
            if hasattr(m, "prepare_compile"):  # quantized layers pick their kernels
                m.prepare_compile(frozen=max_autotune)
        for block in self.blocks:  # what nn.Module.compile does, with our options
            block._compiled_call_impl = compile_inference(block._call_impl, max_autotune)
        return self

    # Forward ------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        actions: Tensor | None,
        context: Tensor,
        cache: KVCache | None = None,
        commit: bool = False,
        camera: Tensor | None = None,
        sigma: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, C, H, W] noisy frames, t [B, T] flow times, actions [B, T] -> x0 [B, T, C, H, W].

        A flow-predicting model's velocity v becomes x0 = x - sigma * v, computed in float64 as
        Self-Forcing does, so the sampler always works with x0; sigma [B, T] is t unless given
        (CausVid feeds its model timestep k and converts with the scheduler's sigma nearest to k).

        Without a cache, T frames are processed as T / frames_per_chunk block-causal chunks
        (training, reference). With a cache, x is one chunk placed after the cached ones;
        `commit=True` also writes its keys/values into the cache (the clean t=0 re-run).
        `camera` [B, T, 2] gives the frames' camera positions to a `camera_rope` model (training
        clips with frames left out, re-committed chunks); by default it is integrated from the
        actions, starting at the cache's camera. Models without `camera_rope` ignore it.
        """
        a = self.args
        B, T, C, H, W = x.shape
        if T % a.frames_per_chunk:
            raise ValueError(f"frame count {T} must be a multiple of frames_per_chunk={a.frames_per_chunk}")
        p, (gh, gw), N = a.patch_size, a.grid, a.tokens_per_frame
        h = self.patch_embedding(x.transpose(1, 2))  # [B, D, T, gh, gw]
        h = h.flatten(2).transpose(1, 2)  # [B, T*N, D]
        e = self._frame_embedding(t, actions)
        e0 = self.time_projection(e).view(B, T, 6, a.dim)

        if not a.camera_rope:
            camera = None
        elif camera is None:
            camera = camera_path(actions, None if cache is None else cache.camera)
        if cache is None:
            freqs = rope_freqs(a, 0, T, camera).to(x.device, compute_dtype(x.dtype))
            chunk_of = torch.arange(T * N, device=x.device) // a.chunk_tokens
            mask = chunk_of[:, None] >= chunk_of[None, :]  # block-causal
            slot = None
        else:
            if T != a.frames_per_chunk:
                raise ValueError("cached generation takes exactly one chunk at a time")
            freqs = rope_freqs(a, cache.time_offset, T, camera).to(x.device, compute_dtype(x.dtype))
            slot, mask = cache.slot()
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else cache.layer(i, slot)
            h = block(h, e0, context, freqs, mask, kv)
            if commit and kv is not None:
                cache.store(i, kv)
        if cache is not None and commit:
            cache.advance(None if camera is None else camera[:, -1])
        out = self.head(h, e)  # [B, T*N, C*p*p]
        if a.patch_channels_last:
            out = out.view(B, T, gh, gw, p, p, C).permute(0, 1, 6, 2, 4, 3, 5)
        else:
            out = out.view(B, T, gh, gw, C, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, T, C, H, W)
        if a.prediction == "flow":
            sigma = (t if sigma is None else sigma).double()[:, :, None, None, None]
            out = (x.double() - sigma * out.double()).to(x.dtype)
        return out
