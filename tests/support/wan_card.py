"""A tiny random Wan model card on disk, laid out like a real one: a Self-Forcing training
checkpoint, and `vae/`, `text_encoder/`, `tokenizer/` folders as in a
`Wan2.1-T2V-1.3B-Diffusers` download, all written offline from random configs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from qarvd_core.model import ModelArgs, WorldModel

# The real layout at toy sizes: 2 blocks of head dim 32, 4 latent channels on a 4x6 latent grid
# (32x48 pixels through the VAE's 8x), UMT5 states of width 24 padded to 16 tokens.
TINY_WAN = replace(
    ModelArgs.from_name("wan2.1-1.3b-causal"),
    dim=64,
    n_layers=2,
    n_heads=2,
    ffn_dim=128,
    in_channels=4,
    frame_height=4,
    frame_width=6,
    text_dim=24,
    text_len=16,
    window_chunks=2,
    sink_chunks=1,
)
WORDS = "a cat dog walks runs on the beach in snow red blue city at night".split()


def random_wan_state(args: ModelArgs = TINY_WAN, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Wan weights with outputs of unit scale: linear weights ~ 1/sqrt(fan_in), norms near 1,
    modulations ~ 1/sqrt(dim) as Wan initialises them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, ref in WorldModel(args).state_dict().items():
        if key.endswith("modulation"):
            v = torch.randn(ref.shape, generator=g) / math.sqrt(args.dim)
        elif ref.ndim == 1 and "norm" in key:
            v = 1 + 0.1 * torch.randn(ref.shape, generator=g)
        elif ref.ndim == 1:
            v = 0.1 * torch.randn(ref.shape, generator=g)
        else:
            v = torch.randn(ref.shape, generator=g) / math.sqrt(ref[0].numel())
        state[key] = v
    return state


def write_tokenizer(folder: Path) -> None:
    """A UMT5-style tokenizer (unigram pieces after a metaspace, `</s>` appended, `<pad>` 0) with a
    few words and the single letters, loaded by transformers as a T5Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0 - 0.1 * i) for i, w in enumerate(WORDS)]
    pieces += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "extra_ids": 0, "model_max_length": 512}))


def write_text_encoder(folder: Path, d_model: int, vocab: int, seed: int = 0) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    UMT5EncoderModel(config).eval().save_pretrained(folder)


def tiny_vae(z_dim: int, seed: int = 0):
    """A random AutoencoderKLWan of Wan's shape (8x in space, 4x in time), latents mean/std not 0/1."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1 * i for i in range(z_dim)],
        latents_std=[1 + 0.2 * i for i in range(z_dim)],
    ).eval()


def write_wan_card(folder: Path, args: ModelArgs = TINY_WAN, sampling: str = "self-forcing") -> Path:
    """Write a tiny random Wan model and its card into `folder`; returns the card's path."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = folder / "Wan2.1-T2V-1.3B-Diffusers"
    (folder / "checkpoints").mkdir()
    state = {f"model.{k}": v for k, v in random_wan_state(args).items()}
    torch.save({"generator_ema": state, "generator": state}, folder / "checkpoints/self_forcing_dmd.pt")
    tiny_vae(args.in_channels).save_pretrained(parts / "vae")
    write_tokenizer(parts / "tokenizer")
    write_text_encoder(parts / "text_encoder", args.text_dim, vocab=3 + len(WORDS) + 26)
    preset = ModelArgs.from_name("wan2.1-1.3b-causal").to_dict()
    card = {
        "format": "qarvd-wan-card",
        "preset": "wan2.1-1.3b-causal",
        "args": {k: v for k, v in args.to_dict().items() if preset[k] != v},
        "transformer": "checkpoints/self_forcing_dmd.pt",
        "vae": "Wan2.1-T2V-1.3B-Diffusers/vae",
        "text_encoder": "Wan2.1-T2V-1.3B-Diffusers/text_encoder",
        "tokenizer": "Wan2.1-T2V-1.3B-Diffusers/tokenizer",
        "sampling": sampling,
    }
    path = folder / "tiny-wan.json"
    path.write_text(json.dumps(card, indent=1))
    return path
