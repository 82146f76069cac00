"""Wan checkpoints: every published layout loads strictly, bad files are refused clearly, and our
forward reproduces Wan's: against diffusers' WanTransformer3DModel on the same weights and
against an independent float64 implementation of the equations written here.

All on a tiny random model of the real layout (2 blocks, head dim 32).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from qarvd_core.checkpoint import load_model
from qarvd_core.model import KVCache, ModelArgs, WorldModel, timestep_embedding
from qarvd_core.sampling import Sampler, denoise_chunk, flowmatch_nearest, flowmatch_schedule
from qarvd_core.wan import SAMPLING_PRESETS, diffusers_name, is_card, load_card_model, load_checkpoint, read_card
from tests.support.wan_card import TINY_WAN, tiny_vae
from tests.support.wan_card import random_wan_state as random_state

TINY = TINY_WAN
# Self-Forcing's four timesteps (1000, 750, 500, 250 warped at shift 5) as flow times.
SELF_FORCING_T = [1.0, 0.9375, 0.8333333, 0.625]


def tiny_model(state=None, args: ModelArgs = TINY) -> WorldModel:
    model = WorldModel(args)
    model.load_state_dict(random_state(args) if state is None else state)
    return model.eval()


def inputs(args: ModelArgs = TINY, chunks: int = 1, B: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    T = chunks * args.frames_per_chunk
    x = torch.randn(B, T, args.in_channels, args.frame_height, args.frame_width, generator=g)
    t = torch.tensor(SELF_FORCING_T)[torch.randint(0, 4, (B, T), generator=g)]
    text = torch.randn(B, args.text_len, args.text_dim, generator=g)
    text[:, 4:] = 0  # UMT5 states are zero past the prompt
    return x, t, text


def forward(model: WorldModel, x, t, text):
    with torch.no_grad():
        return model(x, t, None, model.embed_text(text))


def assert_loads_as(path, state, **kw):
    model = load_checkpoint(WorldModel(TINY), path, **kw)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    return model


# ----------------------------------------------------------------------------- layouts


def _wrapped(state, prefix):
    """Keys as FSDP + activation checkpointing + torch.compile write them inside a DDP wrapper."""
    return {
        prefix + k.replace("blocks.0.", "blocks.0._checkpoint_wrapped_module._orig_mod."): v for k, v in state.items()
    }


@pytest.mark.parametrize(
    "layout",
    ["safetensors", "pt", "self-forcing", "causvid", "wrapped", "explicit-key"],
)
def test_every_checkpoint_layout_loads_strictly(tmp_path, layout):
    state = random_state()
    other = random_state(seed=5)
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pt")
    kw = {}
    if layout == "safetensors":
        save_file(state, str(path))
    elif layout == "pt":
        torch.save(state, path)
    elif layout == "self-forcing":  # EMA preferred over the raw generator; the critic is ignored
        model_keys = {f"model.{k}": v for k, v in state.items()}
        torch.save({"generator_ema": model_keys, "generator": other, "critic": {"x": torch.zeros(1)}}, path)
    elif layout == "causvid":
        torch.save({"generator": {f"model.{k}": v for k, v in state.items()}}, path)
    elif layout == "wrapped":
        torch.save({"generator": _wrapped(state, "module.model._fsdp_wrapped_module.")}, path)
    else:  # the card names the entry
        torch.save({"generator_ema": other, "generator": {f"model.{k}": v for k, v in state.items()}}, path)
        kw["weights_key"] = "generator"
    assert_loads_as(path, state, **kw)


def test_diffusers_names_load_through_diffusers_own_conversion_table(tmp_path):
    convert = pytest.importorskip("diffusers.loaders.single_file_utils").convert_wan_transformer_to_diffusers
    state = random_state()
    theirs = convert(dict(state))  # diffusers' mapping from Wan's names to its own
    assert set(theirs) == {diffusers_name(k) for k in state}
    save_file(theirs, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert_loads_as(tmp_path / "diffusion_pytorch_model.safetensors", state)


def test_longlive_lora_merges_into_the_linear_layers(tmp_path):
    rank, alpha = 4, 8.0
    state = random_state()
    torch.save({"generator": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "base.pt")
    g = torch.Generator().manual_seed(3)
    adapted = [f"blocks.{i}.{m}" for i in range(2) for m in ("self_attn.q", "cross_attn.v", "ffn.0", "ffn.2")]
    lora = {}
    for layer in adapted:
        out_f, in_f = state[f"{layer}.weight"].shape
        lora[f"base_model.model.{layer}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
        lora[f"base_model.model.{layer}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
    torch.save({"generator_lora": lora, "critic_lora": {}}, tmp_path / "lora.pt")
    model = load_checkpoint(
        WorldModel(TINY), tmp_path / "base.pt", lora=tmp_path / "lora.pt", lora_rank=rank, lora_alpha=alpha
    )
    base = tiny_model(state)
    for layer in adapted:
        a, b = lora[f"base_model.model.{layer}.lora_A.weight"], lora[f"base_model.model.{layer}.lora_B.weight"]
        x = torch.randn(5, a.shape[1], generator=g)
        with torch.no_grad():
            expected = base.get_submodule(layer)(x) + alpha / rank * (x @ a.T @ b.T)
            got = model.get_submodule(layer)(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    untouched = "blocks.0.self_attn.k.weight"
    assert torch.equal(model.state_dict()[untouched], state[untouched])

    with pytest.raises(ValueError, match=r"lora_A \[4, 64\].*rank 8"):
        load_checkpoint(WorldModel(TINY), tmp_path / "base.pt", lora=tmp_path / "lora.pt", lora_rank=8, lora_alpha=8.0)


def test_the_wan_preset_has_the_published_1_3b_layout():
    """Self-Forcing's file holds 825 keys for 30 blocks; the shapes are Wan2.1-T2V-1.3B's. Built on
    the meta device, so nothing is allocated."""
    with torch.device("meta"):
        ours = {
            k: tuple(v.shape) for k, v in WorldModel(ModelArgs.from_name("wan2.1-1.3b-causal")).state_dict().items()
        }
    assert len(ours) == 825
    assert ours["patch_embedding.weight"] == (1536, 16, 1, 2, 2) and ours["text_embedding.0.weight"] == (1536, 4096)
    assert ours["time_projection.1.weight"] == (9216, 1536) and ours["blocks.29.modulation"] == (1, 6, 1536)
    assert ours["blocks.0.ffn.0.weight"] == (8960, 1536) and ours["head.head.weight"] == (64, 1536)
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):  # Wan2.1-T2V-1.3B-Diffusers' transformer config
        ref = diffusers.WanTransformer3DModel(
            num_attention_heads=12, attention_head_dim=128, text_dim=4096, ffn_dim=8960, num_layers=30
        ).state_dict()
    assert {diffusers_name(k): shape for k, shape in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


# ----------------------------------------------------------------------------- refusals


def test_mismatched_checkpoints_are_refused_with_the_key_shapes_and_what_to_do(tmp_path):
    state = random_state()
    missing = dict(state)
    del missing["blocks.1.ffn.2.bias"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"1 missing keys \(blocks\.1\.ffn\.2\.bias\).*Check that the card"):
        load_checkpoint(WorldModel(TINY), tmp_path / "missing.pt")

    torch.save({**state, "blocks.0.self_attn.extra": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"1 unexpected keys \(blocks\.0\.self_attn\.extra\)"):
        load_checkpoint(WorldModel(TINY), tmp_path / "extra.pt")

    bigger = random_state(replace(TINY, dim=96, n_heads=3))
    save_file(bigger, str(tmp_path / "bigger.safetensors"))
    with pytest.raises(ValueError, match=r"patch_embedding\.weight: file \[96, 4, 1, 2, 2\], model \[64, 4, 1, 2, 2\]"):
        load_checkpoint(WorldModel(TINY), tmp_path / "bigger.safetensors")


def test_damaged_or_foreign_files_are_refused_clearly(tmp_path):
    state = random_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="damaged; copy it again"):
            load_checkpoint(WorldModel(TINY), tmp_path / f"cut-{name}")

    torch.save({"generator": state, "config": ModelArgs()}, tmp_path / "objects.pt")  # a pickled dataclass
    with pytest.raises(ValueError, match="Python objects besides tensors.*weights_only"):
        load_checkpoint(WorldModel(TINY), tmp_path / "objects.pt")

    torch.save({"step": torch.tensor(3), "optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a state dict nor a training checkpoint.*'step', 'optimizer'"):
        load_checkpoint(WorldModel(TINY), tmp_path / "other.pt")

    with pytest.raises(ValueError, match="no checkpoint file"):
        load_checkpoint(WorldModel(TINY), tmp_path / "absent.pt")


# ----------------------------------------------------------------------------- model cards


# The tiny layout, on the tiny latent grid: the preset's 60x104 grid makes every pass seconds long.
CARD_ARGS = ("dim", "n_layers", "n_heads", "ffn_dim", "in_channels", "text_dim", "frame_height", "frame_width")


def _write_card(tmp_path, **fields):
    card = {
        "format": "qarvd-wan-card",
        "preset": "wan2.1-1.3b-causal",
        "args": {k: getattr(TINY, k) for k in CARD_ARGS},
        "transformer": "checkpoints/self_forcing_dmd.pt",
        "vae": "Wan2.1-T2V-1.3B-Diffusers/vae",
        "text_encoder": "Wan2.1-T2V-1.3B-Diffusers/text_encoder",
        "tokenizer": "Wan2.1-T2V-1.3B-Diffusers/tokenizer",
        "sampling": "self-forcing",
        **fields,
    }
    path = tmp_path / "self-forcing.json"
    path.write_text(json.dumps(card))
    return path


def test_a_model_card_names_the_files_and_loads_the_model(tmp_path):
    state = random_state()
    (tmp_path / "checkpoints").mkdir()
    checkpoint = tmp_path / "checkpoints/self_forcing_dmd.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in state.items()}}, checkpoint)
    path = _write_card(tmp_path, args={**json.loads(_write_card(tmp_path).read_text())["args"], "text_len": 7})
    assert is_card(path) and not is_card(checkpoint)
    card = read_card(path)
    assert card.vae == tmp_path / "Wan2.1-T2V-1.3B-Diffusers/vae" and card.sampling == SAMPLING_PRESETS["self-forcing"]
    assert card.weights_key == "generator_ema"  # the sampling preset's default
    model = load_model(str(path), dtype=torch.bfloat16)  # load_model takes a card where it takes a weights path
    assert model.card == card and model.args.prediction == "flow" and model.args.patch_channels_last
    assert next(model.parameters()).dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k].to(torch.bfloat16)), k


def test_a_longlive_card_merges_its_lora(tmp_path):
    state = random_state()
    (tmp_path / "checkpoints").mkdir()
    base = {f"model.{k}": v for k, v in state.items()}
    torch.save({"generator": base, "generator_ema": {}}, tmp_path / "checkpoints/self_forcing_dmd.pt")
    a, b = torch.randn(2, 64), torch.randn(64, 2)
    torch.save(
        {
            "generator_lora": {
                "base_model.model.blocks.1.self_attn.o.lora_A.weight": a,
                "base_model.model.blocks.1.self_attn.o.lora_B.weight": b,
            }
        },
        tmp_path / "lora.pt",
    )
    path = _write_card(tmp_path, sampling="longlive", lora={"file": "lora.pt", "rank": 2, "alpha": 4})
    model = load_card_model(path)
    merged = model.state_dict()["blocks.1.self_attn.o.weight"]
    torch.testing.assert_close(merged, state["blocks.1.self_attn.o.weight"] + 2 * b @ a)
    # LongLive's window (local_attn_size 12, sink_size 3, 3-frame chunks), its RoPE and re-cache.
    a = model.args
    assert (a.frames_per_chunk, a.sink_chunks, a.window_chunks, a.absolute_time) == (3, 1, 2, True)
    assert a.context_chunks * a.frames_per_chunk == 12 and Sampler.for_model(model).global_sink


def test_cards_naming_their_sampling_preset_recipe_still_load(tmp_path):
    card = json.loads(_write_card(tmp_path).read_text())
    card["recipe"] = card.pop("sampling")
    (tmp_path / "old.json").write_text(json.dumps(card))
    assert read_card(tmp_path / "old.json").sampling == SAMPLING_PRESETS["self-forcing"]


def test_bad_model_cards_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown sampling preset 'fast'.*self-forcing, causvid, longlive"):
        read_card(_write_card(tmp_path, sampling="fast"))
    with pytest.raises(ValueError, match="bad args"):
        read_card(_write_card(tmp_path, args={"width": 3}))
    with pytest.raises(ValueError, match="no checkpoint file at .*self_forcing_dmd.pt"):
        load_card_model(_write_card(tmp_path))
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"format": "qarvd-wan-card", "preset": "wan2.1-1.3b-causal"}))
    with pytest.raises(ValueError, match="lacks transformer, vae, text_encoder, tokenizer, sampling"):
        read_card(path)


# ----------------------------------------------------------------------------- parity with diffusers


def _diffusers_twin(tmp_path):
    """diffusers' WanTransformer3DModel with random weights, and our model loaded from its file."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=TINY.n_heads,
        attention_head_dim=TINY.head_dim,
        in_channels=TINY.in_channels,
        out_channels=TINY.in_channels,
        text_dim=TINY.text_dim,
        freq_dim=TINY.freq_dim,
        ffn_dim=TINY.ffn_dim,
        num_layers=TINY.n_layers,
        cross_attn_norm=True,
        eps=TINY.eps,
    ).eval()
    convert = pytest.importorskip("diffusers.loaders.single_file_utils").convert_wan_transformer_to_diffusers
    ref.load_state_dict(convert(random_state()), strict=True)  # unit-scale weights, renamed by diffusers
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "diffusers.safetensors"))
    model = load_checkpoint(WorldModel(TINY), tmp_path / "diffusers.safetensors").eval()
    return ref, model


def _diffusers_x0(ref, x, t, text, mask=None):
    """x0 from diffusers' velocity, with per-token timesteps 1000 t; `mask` [L, L] is given to its
    self-attention through the attention-processor interface (its model is bidirectional)."""
    if mask is not None:
        for block in ref.blocks:
            inner = block.attn1.processor

            def masked(attn, hidden, encoder_hidden=None, attention_mask=None, rotary_emb=None, inner=inner):
                return inner(attn, hidden, encoder_hidden, mask, rotary_emb)

            block.attn1.processor = masked
    B, T = t.shape
    tokens = TINY.tokens_per_frame
    timestep = (t.float() * 1000).repeat_interleave(tokens, dim=1)  # [B, T * tokens]
    with torch.no_grad():
        v = ref(x.transpose(1, 2), timestep, text, return_dict=False)[0].transpose(1, 2)
    return (x.double() - t.double()[:, :, None, None, None] * v.double()).float(), v


def test_one_chunk_with_per_frame_timesteps_matches_diffusers(tmp_path):
    ref, model = _diffusers_twin(tmp_path)
    x, t, text = inputs(chunks=1)
    expected, v = _diffusers_x0(ref, x, t, text)  # one chunk: full attention, no mask needed
    assert 0.3 < v.std() < 3  # unit-scale outputs
    got = forward(model, x, t, text)
    # diffusers builds the timestep sinusoid in float32 where Wan uses float64: ~3e-5 of the gap.
    assert (got - expected).abs().max() <= 1e-4


def test_several_chunks_block_causally_match_diffusers_with_a_block_causal_mask(tmp_path):
    ref, model = _diffusers_twin(tmp_path)
    x, t, text = inputs(chunks=3)
    chunk = torch.arange(x.shape[1] * TINY.tokens_per_frame) // TINY.chunk_tokens
    expected, _ = _diffusers_x0(ref, x, t, text, mask=chunk[:, None] >= chunk[None, :])
    got = forward(model, x, t, text)
    assert (got - expected).abs().max() <= 1e-4
    # The mask matters: without it, the first chunks see the later ones.
    unmasked, _ = _diffusers_x0(_diffusers_twin(tmp_path)[0], x, t, text)
    assert (got[:, :3] - unmasked[:, :3]).abs().max() > 1e-2


def test_streaming_with_a_cache_equals_the_full_sequence_pass():
    """Self-Forcing's pattern: clean chunks committed at t = 0, then a chunk denoised against them."""
    model = tiny_model()
    x, t, text = inputs(chunks=3)
    t[:, :6] = 0  # the context chunks are clean
    context = model.embed_text(text)
    Fr = TINY.frames_per_chunk
    with torch.no_grad():
        full = model(x, t, None, context)
        cache = KVCache(TINY, 2)
        for k in range(2):
            model(x[:, k * Fr : (k + 1) * Fr], t[:, k * Fr : (k + 1) * Fr], None, context, cache=cache, commit=True)
        first = model(x[:, 2 * Fr :], t[:, 2 * Fr :], None, context, cache=cache)
        again = model(x[:, 2 * Fr :], t[:, 2 * Fr :], None, context, cache=cache)  # a denoising pass keeps the cache
    assert (first - full[:, 2 * Fr :]).abs().max() <= 1e-5
    assert torch.equal(first, again)


# ----------------------------------------------------------------------------- float64 reference


def _reference_wan(sd, x, t, text, fpc):
    """Wan's forward in float64 from its equations: x0 [B, T, C, H, W] for block-causal chunks of
    `fpc` frames. `sd` holds Wan's weights by name; nothing here uses qarvd's or diffusers' modules."""
    sd = {k: v.double() for k, v in sd.items()}
    x, text = x.double(), text.double()
    B, T, C, H, W = x.shape
    p, D, nh = 2, sd["patch_embedding.bias"].shape[0], TINY.n_heads
    hd, gh, gw = D // nh, H // p, W // p
    N = gh * gw

    def lin(h, name):
        return h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def layer_norm(h, name=None):
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
        return h if name is None else h * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    def rms_norm(h, name):
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f"{name}.weight"]

    def gelu_tanh(h):
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))

    def silu(h):
        return h / (1 + torch.exp(-h))

    # Patches in (frame, row, column) order, each flattened as (channel, dy, dx) like the conv kernel.
    patches = x.reshape(B, T, C, gh, p, gw, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, T * N, C * p * p)
    h = patches @ sd["patch_embedding.weight"].reshape(D, -1).T + sd["patch_embedding.bias"]

    steps = (t.float() * 1000).double()  # the scheduler's float32 timesteps
    half = TINY.freq_dim // 2
    angle = steps[..., None] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    e = lin(silu(lin(torch.cat([angle.cos(), angle.sin()], -1), "time_embedding.0")), "time_embedding.2")
    e0 = lin(silu(e), "time_projection.1").view(B, T, 6, D)
    ctx = lin(gelu_tanh(lin(text, "text_embedding.0")), "text_embedding.2")

    # RoPE: head dims split time / height / width, consecutive pairs rotated as complex numbers.
    dh = 2 * (hd // 6)
    dt = hd - 2 * dh
    pos = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(gh), torch.arange(gw), indexing="ij"), -1)
    pos = pos.reshape(T * N, 3).double()
    axes = enumerate((dt, dh, dh))
    angles = torch.cat([pos[:, i, None] * 10000.0 ** (-torch.arange(0, d, 2).double() / d) for i, d in axes], -1)
    rot = torch.polar(torch.ones_like(angles), angles)  # [L, hd / 2]

    def rope(q):  # [B, L, nh, hd]
        qc = torch.view_as_complex(q.reshape(*q.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(qc * rot[None, :, None]).flatten(-2)

    chunk = torch.arange(T * N) // (fpc * N)
    causal = chunk[:, None] >= chunk[None, :]

    def attention(q, k, v, mask=None):  # [B, L, nh, hd] each
        s = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.einsum("bhlm,bmhd->blhd", torch.softmax(s, -1), v).reshape(B, q.shape[1], D)

    def per_frame(h):
        return h.view(B, T, N, D)

    for i in range(TINY.n_layers):
        b = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = (sd[f"{b}.modulation"][None] + e0).unbind(2)  # [B, T, D]
        y = (per_frame(layer_norm(h)) * (1 + scale1[:, :, None]) + shift1[:, :, None]).view(B, T * N, D)
        q = rope(rms_norm(lin(y, f"{b}.self_attn.q"), f"{b}.self_attn.norm_q").view(B, -1, nh, hd))
        k = rope(rms_norm(lin(y, f"{b}.self_attn.k"), f"{b}.self_attn.norm_k").view(B, -1, nh, hd))
        v = lin(y, f"{b}.self_attn.v").view(B, -1, nh, hd)
        y = lin(attention(q, k, v, causal), f"{b}.self_attn.o")
        h = h + (per_frame(y) * gate1[:, :, None]).view(B, T * N, D)
        y = layer_norm(h, f"{b}.norm3")
        q = rms_norm(lin(y, f"{b}.cross_attn.q"), f"{b}.cross_attn.norm_q").view(B, -1, nh, hd)
        k = rms_norm(lin(ctx, f"{b}.cross_attn.k"), f"{b}.cross_attn.norm_k").view(B, -1, nh, hd)
        v = lin(ctx, f"{b}.cross_attn.v").view(B, -1, nh, hd)
        h = h + lin(attention(q, k, v), f"{b}.cross_attn.o")
        y = (per_frame(layer_norm(h)) * (1 + scale2[:, :, None]) + shift2[:, :, None]).view(B, T * N, D)
        y = lin(gelu_tanh(lin(y, f"{b}.ffn.0")), f"{b}.ffn.2")
        h = h + (per_frame(y) * gate2[:, :, None]).view(B, T * N, D)

    shift, scale = (sd["head.modulation"][None] + e[:, :, None]).unbind(2)  # [B, T, D]
    out = lin((per_frame(layer_norm(h)) * (1 + scale[:, :, None]) + shift[:, :, None]).view(B, T * N, D), "head.head")
    # Each patch's outputs are (dy, dx, channel): channels last.
    v = out.view(B, T, gh, gw, p, p, C).permute(0, 1, 6, 2, 4, 3, 5).reshape(B, T, C, H, W)
    return x - t.double()[:, :, None, None, None] * v


def test_forward_matches_a_float64_reference_written_from_the_equations():
    state = random_state()
    model = tiny_model(state).double()
    x, t, text = inputs(chunks=3)
    expected = _reference_wan(state, x, t, text, TINY.frames_per_chunk)
    with torch.no_grad():
        got = model(x.double(), t, None, model.embed_text(text.double()))
    assert got.dtype == torch.float64
    assert (got - expected).abs().max() <= 1e-6
    assert (expected - x.double()).abs().mean() > 0.1  # the velocity is not negligible


# ----------------------------------------------------------------------------- sampler


def test_flowmatch_schedule_is_the_schedulers_float32_sigmas():
    """Self-Forcing: FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True) over 1000 steps,
    its step list [1000, 750, 500, 250] warped through the scheduler's timesteps."""
    shift = 5.0
    sigmas = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.cat([sigmas * 1000, torch.zeros(1)])
    warped = timesteps[1000 - torch.tensor([1000, 750, 500, 250])]
    t = flowmatch_schedule([1000, 750, 500, 250], shift)
    assert torch.equal(torch.tensor(t) * 1000, warped)  # the model's timesteps, bit for bit
    torch.testing.assert_close(torch.tensor(t), torch.tensor([1.0, 0.9375, 5 / 6, 0.625]))
    assert flowmatch_schedule([1000, 0], 8.0) == [1.0, 0.0]
    with pytest.raises(ValueError, match="within"):
        flowmatch_schedule([1001], shift)


def test_causvid_feeds_its_steps_as_timesteps_and_reads_them_with_the_nearest_sigma(tmp_path):
    """CausVid's inference (causal_inference.py, wan_wrapper.py, flow_match.py), written here from
    its code: FlowMatchScheduler(shift=8, sigma_min=0, extra_one_step=True) with 1000 training
    timesteps; denoising_step_list [1000, 757, 522, 0] without its trailing 0 and not warped; the
    model gets the timestep k itself; x0 = x_t - sigma v with sigma = sigmas[argmin |timesteps - k|]
    in float64; add_noise looks the next step's sigma up the same way in float32, with fresh
    noise; the clean chunk is committed at timestep 0."""
    (tmp_path / "checkpoints").mkdir()
    torch.save({"generator": {f"model.{k}": v for k, v in random_state().items()}}, tmp_path / "checkpoints/m.pt")
    model = load_card_model(_write_card(tmp_path, sampling="causvid", transformer="checkpoints/m.pt"))
    shift = 8.0
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    steps = torch.tensor([1000, 757, 522, 0])[:-1]

    sampler = Sampler.for_model(model)
    assert sampler.fresh_noise and len(sampler.schedule) == 3
    t = torch.tensor(sampler.schedule)
    # The model's timestep is k, bit for bit: its sinusoid is Wan's of the integer step.
    half = TINY.freq_dim // 2
    wan = steps.double()[:, None] * torch.pow(10000, -torch.arange(half).double() / half)
    assert torch.equal(timestep_embedding(t, TINY.freq_dim, fp64=True), torch.cat([wan.cos(), wan.sin()], 1))
    assert not torch.equal(torch.tensor(sampler.sigmas), t)  # the nearest sigmas are not k / 1000

    a = model.args
    shape = (1, a.frames_per_chunk, a.in_channels, a.frame_height, a.frame_width)
    text = torch.randn(1, a.text_len, a.text_dim, generator=torch.Generator().manual_seed(2))
    context = model.embed_text(text)
    expected, g = [], torch.Generator().manual_seed(7)
    cache = KVCache(a, 1)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(shape, generator=g)
            for i, k in enumerate(steps):
                sigma = sigmas.double()[torch.argmin((timesteps.double() - k.double()).abs())]
                tt = torch.full((1, a.frames_per_chunk), k.item() / 1000)
                x0 = model(x, tt, None, context, cache=cache, sigma=sigma.expand(1, a.frames_per_chunk))
                if i + 1 < len(steps):
                    s = sigmas[torch.argmin((timesteps - steps[i + 1]).abs())]
                    x = ((1 - s) * x0 + s * torch.randn(shape, generator=g)).type_as(x0)
            model(x0, torch.zeros(1, a.frames_per_chunk), None, context, cache=cache, commit=True)
            expected.append(x0)
    ours, cache, g = [], KVCache(a, 1), torch.Generator().manual_seed(7)
    actions = torch.zeros(1, a.frames_per_chunk, dtype=torch.long)
    for _ in range(2):
        ours.append(denoise_chunk(model, cache, context, actions, lambda: torch.randn(shape, generator=g), sampler))
    assert torch.equal(torch.cat(ours, 1), torch.cat(expected, 1))
    with pytest.raises(ValueError, match="timestep k back"):
        flowmatch_nearest([127], shift)  # 0.127 in float32, times 1000, is not 127


def test_latent_models_are_not_clamped_while_sampling():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 3, TINY.in_channels, TINY.frame_height, TINY.frame_width, generator=g)
    context = model.embed_text(torch.randn(1, TINY.text_len, TINY.text_dim, generator=g))
    schedule, _ = SAMPLING_PRESETS["self-forcing"].times()
    actions = torch.zeros(1, 3, dtype=torch.long)
    x0 = denoise_chunk(model, KVCache(TINY, 1), context, actions, lambda: noise, Sampler(tuple(schedule)))
    assert x0.abs().max() > 1.5


# ----------------------------------------------------------------------------- VAE


def test_streaming_vae_decode_equals_one_shot_decode():
    pytest.importorskip("diffusers")
    from qarvd_core.wan_vae import StreamDecoder

    z = 4
    vae = tiny_vae(z)
    latents = torch.randn(1, 9, z, 4, 6)  # normalised, as the transformer makes them
    shape = (1, z, 1, 1, 1)
    raw = latents.transpose(1, 2) * torch.tensor(vae.config.latents_std).view(shape)
    raw = raw + torch.tensor(vae.config.latents_mean).view(shape)
    with torch.no_grad():
        one_shot = vae.decode(raw).sample.transpose(1, 2)
        restarted = vae.decode(raw[:, :, 3:6]).sample.transpose(1, 2)  # decode() clears its cache
    decoder = StreamDecoder(vae)
    chunks = [decoder.decode(latents[:, k : k + 3]) for k in range(0, 9, 3)]
    assert [c.shape[1] for c in chunks] == [9, 12, 12] and one_shot.shape[1] == 33
    assert torch.equal(torch.cat(chunks, 1), one_shot)
    assert 0.1 < one_shot.std() and (one_shot.abs() == 1).float().mean() < 0.01  # not saturated
    assert restarted.shape[1] == 9  # without the cache, the second chunk starts a new video
    decoder.reset()
    assert torch.equal(decoder.decode(latents[:, :3]), chunks[0])
