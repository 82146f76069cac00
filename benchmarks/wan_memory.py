"""Memory budget of the Wan 2.1 1.3B causal model, from the sizes of its real tensors.

Weights and the text encoder are counted on the meta device from their real configurations
(nothing is downloaded or allocated); the KV cache per session is the `KVCache` a stream
holds, in bf16 and quantized (`--kv-bits 8` and `auto`), as tensor bytes; the VAE's decoder
cache per stream is measured by decoding a latent chunk with a randomly initialised
`AutoencoderKLWan` of Wan 2.1's configuration and summing the tensors
`StreamDecoder` keeps (the last two frames at every causal convolution). Sessions per device
divide what the resident models leave by a session's bytes as the server counts them. Every cached tensor
is [B, C, 2, h, w] at the latent size times 1, 2, 4 or 8, so its size is proportional to the
latent area: the chunk is decoded at a quarter of the 60x104 latent's height and width (a
CPU decode at full size takes minutes) and the sum scaled by 16, exactly.

    python benchmarks/wan_memory.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qarvd_core.model import KVCache, ModelArgs, WorldModel
from qarvd_core.quant.kv import AUTO, KVQuantConfig
from qarvd_core.wan_vae import StreamDecoder

MIB = 2**20
KV_SETTINGS = {"int8": KVQuantConfig(8, 8), "int4 (sink int8)": AUTO}
DEVICE_GIB = (80, 141)  # H100 80 GB, H200 141 GB
# UMT5-XXL's encoder as Wan2.1-T2V-1.3B-Diffusers/text_encoder/config.json describes it.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def vae_cache_bytes(args: ModelArgs) -> tuple[int, int]:
    """(VAE parameters, bytes of one stream's decoder cache in bf16 at the model's frame size)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan().eval()  # the default configuration is Wan 2.1's VAE
    decoder = StreamDecoder(vae)
    h, w = args.frame_height // 4, args.frame_width // 4
    assert (h * 4, w * 4) == (args.frame_height, args.frame_width)
    decoder.decode(torch.randn(1, args.frames_per_chunk, args.in_channels, h, w))
    cache = sum(t.numel() for t in decoder.cache if isinstance(t, torch.Tensor))
    return numel(vae), cache * 16 * 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    from transformers import UMT5Config, UMT5EncoderModel

    args = ModelArgs.from_name("wan2.1-1.3b-causal")
    with torch.device("meta"):
        transformer = numel(WorldModel(args))
        text = numel(UMT5EncoderModel(UMT5Config(**UMT5_XXL)))
    cache = KVCache(args, 1, device="meta", dtype=torch.bfloat16)
    kv = cache.full_nbytes
    kv_at = {name: KVCache(args, 1, "meta", torch.bfloat16, quant).full_nbytes for name, quant in KV_SETTINGS.items()}
    vae, vae_cache = vae_cache_bytes(args)
    rows = {
        "transformer parameters": transformer,
        "transformer bf16 MiB": transformer * 2 / MIB,
        "KV cache per session, bf16 MiB": kv / MIB,
        "VAE parameters": vae,
        "VAE bf16 MiB": vae * 2 / MIB,
        "VAE decoder cache per session, bf16 MiB": vae_cache / MIB,
        "text encoder (UMT5-XXL) parameters": text,
        "text encoder bf16 MiB": text * 2 / MIB,
        "prompt states per prompt, bf16 MiB": args.text_len * args.text_dim * 2 / MIB,
        **{f"KV cache per session, {name} MiB": n / MIB for name, n in kv_at.items()},
    }
    # What the server counts per session (service/engine: `_warm_up`): the KV cache as stored and
    # the VAE decoder cache, its row of the model's batch buffers (all layers for a full-precision
    # cache, which is gathered there; one layer's working buffer for a quantized one) and a
    # quantized cache's batched copy of its stores while a chunk is made. A chunk's activations
    # are not counted.
    one_layer = kv // args.n_layers
    session = {"bf16": 2 * kv + vae_cache, **{name: 2 * n + one_layer + vae_cache for name, n in kv_at.items()}}
    rows |= {f"session as the server counts it, KV {name} MiB": n / MIB for name, n in session.items()}
    # Sessions one device holds: what is left after the resident models (transformer at bf16 or
    # int8 weights, and the VAE; the text encoder is released once prompts are encoded), over
    # one session's bytes.
    resident = {"bf16 weights": transformer * 2 + vae * 2, "int8 weights": transformer + vae * 2}
    sessions = {
        f"{gib} GiB device, {w}, KV {name}": int((gib * 2**30 - r) // n)
        for gib in DEVICE_GIB
        for w, r in resident.items()
        for name, n in session.items()
    }
    result = {
        "rows": {k: round(v, 1) if isinstance(v, float) else v for k, v in rows.items()},
        "kv_cache_shape": list(cache.k.shape),
        "sessions_per_device": sessions,
        "command": "python benchmarks/wan_memory.py " + " ".join(sys.argv[1:]),
    }
    text_out = json.dumps(result, indent=2)
    if a.json:
        a.json.write_text(text_out + "\n")
    print(text_out)


if __name__ == "__main__":
    main()
