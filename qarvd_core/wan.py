"""Wan 2.1 causal checkpoints (Self-Forcing, CausVid, LongLive) from local files, and the model
card that makes one a qarvd model name.

A checkpoint is read as tensors only (`torch.load(weights_only=True)` or safetensors), in any of
the layouts these projects publish:

- a plain state dict with Wan's key names (`blocks.0.self_attn.q.weight`, ...), which are ours;
- a training checkpoint `{"generator_ema": ..., "generator": ..., "critic": ...}` whose
  generator keys are `model.<wan key>` (Self-Forcing; CausVid has `generator` only);
- keys under training wrappers: `module.` (DDP), `_fsdp_wrapped_module.`,
  `_checkpoint_wrapped_module.`, `_orig_mod.` (torch.compile), at any depth;
- diffusers' `WanTransformer3DModel` names, renamed by diffusers' own Wan conversion table;
- a LongLive base plus its LoRA (`{"generator_lora": peft state dict}`, rank and alpha from the
  card), merged into the dense weights as W + (alpha / rank) B A.

Loading is strict: a missing, unexpected or wrongly shaped key is refused with its name, both
shapes and what to check. Model cards (`"format": "qarvd-wan-card"`) are JSON files beside the
weights; paths in them are relative to the card. A model loaded from a card carries the card's
sampling preset (how its project runs inference: `SAMPLING_PRESETS`) and its text encoder and
VAE (`CardParts`), so a `sampling.Stream` over it takes text prompts and yields decoded frames.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from qarvd_core.model import ModelArgs, WorldModel
from qarvd_core.sampling import flowmatch_nearest, flowmatch_schedule
from qarvd_core.wan_text import TextEncoder
from qarvd_core.wan_vae import StreamDecoder, load_vae

CARD_FORMAT = "qarvd-wan-card"
# Training-checkpoint entries holding a generator's weights, in order of preference when a
# checkpoint is loaded without a card (EMA first, as Self-Forcing's README runs inference).
GENERATOR_KEYS = ("generator_ema", "generator")
LORA_KEY = "generator_lora"
# Wrapper modules that insert a name segment anywhere in a key, and prefixes of the outermost
# wrappers (DDP's `module.`, the training wrapper whose only child is the Wan model).
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
WRAPPER_PREFIXES = ("module.", "model.")
PEFT_PREFIX = "base_model.model."
# Wan name -> diffusers WanTransformer3DModel name: the text-to-video entries of diffusers'
# `convert_wan_transformer_to_diffusers`, applied in this order as substring replacements
# (the norm2/norm3 swap goes through a placeholder, as there).
DIFFUSERS_RENAMES = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("cross_attn", "attn2"),
    ("self_attn", "attn1"),
    (".o.", ".to_out.0."),
    (".q.", ".to_q."),
    (".k.", ".to_k."),
    (".v.", ".to_v."),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
)


# ----------------------------------------------------------------------------- key names


def strip_wrappers(key: str) -> str:
    """A key without training-wrapper segments and prefixes: `module.model._orig_mod.blocks.0...` -> `blocks.0...`."""
    for segment in WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def diffusers_name(key: str) -> str:
    """Our (Wan) key -> diffusers' `WanTransformer3DModel` key."""
    for old, new in DIFFUSERS_RENAMES:
        key = key.replace(old, new)
    return key


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


def to_wan_names(state: dict[str, Tensor], model_keys, source: str = "checkpoint") -> dict[str, Tensor]:
    """Rename a state dict's keys to ours: wrappers stripped, diffusers names mapped back.

    Keys with no counterpart keep their name, so a strict load reports them as unexpected.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = strip_wrappers(key)
        if name in out:
            raise ValueError(f"{source}: two keys become {name!r} once wrapper prefixes are removed (one is {key!r})")
        out[name] = value
    if is_diffusers_layout(out):
        ours = {diffusers_name(k): k for k in model_keys}
        out = {ours.get(k, k): v for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------- files


def read_tensors(path: Path | str) -> dict:
    """The object in a `.safetensors` or torch file, read as tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} cannot be read as safetensors ({e}): the file is damaged; copy it again") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects besides tensors, which are not loaded (weights_only): re-save its "
            f"state dict alone with torch.save(state_dict, path) or as .safetensors ({str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} cannot be read as a torch checkpoint ({e}): it is damaged; copy it again") from e


def select_state(obj, source: str, weights_key: str | None = None) -> dict[str, Tensor]:
    """The state dict in a loaded checkpoint: `obj[weights_key]`, a generator entry, or obj itself."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict")
    if weights_key is not None:
        if weights_key not in obj:
            raise ValueError(f"{source} has no {weights_key!r} entry; its top-level keys: {_some(obj)}")
        obj = obj[weights_key]
    elif not all(isinstance(v, Tensor) for v in obj.values()):
        for key in GENERATOR_KEYS:
            if key in obj:
                obj = obj[key]
                break
        else:
            raise ValueError(
                f"{source} is neither a state dict nor a training checkpoint with {' or '.join(GENERATOR_KEYS)}; "
                f"its top-level keys: {_some(obj)}. Name the entry holding the weights as weights_key in the card"
            )
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{source}: entries {bad[:3]} are not tensors; point weights_key at the model's state dict")
    return obj


def _some(d: dict, n: int = 8) -> str:
    keys = list(d)
    return ", ".join(map(repr, keys[:n])) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def merge_lora(state: dict[str, Tensor], lora: dict[str, Tensor], rank: int, alpha: float, source: str) -> None:
    """Merge a peft LoRA (`<layer>.lora_A[.adapter].weight` [rank, in], `lora_B` [out, rank]) into
    `state` (our key names) in place: W += (alpha / rank) B A, computed in float32."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in lora.items():
        name = strip_wrappers(key.removeprefix(PEFT_PREFIX))
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if m is None:
            raise ValueError(f"{source}: {key!r} is not a LoRA weight (<layer>.lora_A.weight or .lora_B.weight)")
        pairs.setdefault(m[1], {})[m[2]] = value
    if not pairs:
        raise ValueError(f"{source} holds no LoRA weights")
    for layer, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{source}: {layer} has lora_{''.join(ab)} but not its pair")
        target = f"{layer}.weight"
        if target not in state:
            raise ValueError(f"{source}: the LoRA adapts {layer}, which the base checkpoint does not have")
        a, b, w = ab["A"], ab["B"], state[target]
        if a.shape[0] != rank or b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(
                f"{source}: {layer} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, which do not fit "
                f"rank {rank} and the weight {list(w.shape)}: check the rank in the card"
            )
        state[target] = (w.float() + (alpha / rank) * (b.float() @ a.float())).to(w.dtype)


def load_strict(model: WorldModel, state: dict[str, Tensor], source: str) -> WorldModel:
    """Put `state` into `model` in the model's dtypes, refusing any missing, unexpected or wrongly
    shaped key. The tensors are assigned, so a model built on the meta device never holds a copy."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {list(state[k].shape)}, model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        more = ", ..." if len(unexpected) > 3 else ""
        problems.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}{more})")
    if shapes:
        problems.append(f"{len(shapes)} wrongly shaped ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
    if problems:
        a = model.args
        raise ValueError(
            f"{source} does not fit a {a.n_layers}-block, dim-{a.dim} model: {'; '.join(problems)}. "
            "Check that the card's preset and args describe this checkpoint (model size, in_channels, text_dim) "
            "and, for a training checkpoint, its weights_key"
        )
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in expected.items()}, assign=True)
    return model


def load_checkpoint(
    model: WorldModel,
    path: Path | str,
    weights_key: str | None = None,
    lora: Path | str | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
) -> WorldModel:
    """Load a Wan checkpoint in any supported layout (and merge a LoRA) strictly into `model`."""
    state = to_wan_names(select_state(read_tensors(path), str(path), weights_key), model.state_dict(), str(path))
    if lora is not None:
        if lora_rank is None or lora_alpha is None:
            raise ValueError("a LoRA needs its rank and alpha (peft's r and lora_alpha)")
        obj = read_tensors(lora)
        lora_state = select_state(obj, str(lora), LORA_KEY if LORA_KEY in obj else None)
        merge_lora(state, lora_state, lora_rank, lora_alpha, str(lora))
    return load_strict(model, state, str(path))


# ----------------------------------------------------------------------------- model cards


@dataclass(frozen=True)
class Lora:
    path: Path
    rank: int
    alpha: float


@dataclass(frozen=True)
class ModelCard:
    """What a Wan model is made of; paths resolved against the card's folder.

    JSON fields: `format` ("qarvd-wan-card"), `preset` (a qarvd preset) and optional `args`
    (fields overriding it and the sampling preset's), `transformer` (the checkpoint file),
    optional `weights_key`, optional `lora` {file, rank, alpha}, `vae` and `text_encoder`
    (diffusers-style folders, e.g. `Wan2.1-T2V-1.3B-Diffusers/vae`), `tokenizer`, and `sampling`
    (a name in SAMPLING_PRESETS; its weights_key is the default). Cards that name it `recipe`
    still load.
    """

    path: Path
    preset: str
    args: ModelArgs  # the preset's, with the card's overrides
    transformer: Path
    weights_key: str | None
    lora: Lora | None
    vae: Path
    text_encoder: Path
    tokenizer: Path
    sampling: SamplingPreset


@dataclass(frozen=True)
class SamplingPreset:
    """How a project runs inference on its checkpoint (not a quantization recipe): which weights
    it loads, its denoising steps on the 1000-step FlowMatch schedule and the schedule's shift,
    whether the steps are warped onto the scheduler's timesteps (`sampling.flowmatch_schedule`)
    or fed as they are (`sampling.flowmatch_nearest`), and the model settings its config sets
    (`args`: the attention window). Every preset re-noises with fresh noise between steps
    (`scheduler.add_noise(x0, randn_like(x0), t')`); `global_sink`: a prompt switch re-caches
    the window and keeps the sink (`sampling.Stream.set_prompt`)."""

    weights_key: str
    steps: tuple[int, ...]
    shift: float
    warp: bool = True
    args: tuple[tuple[str, object], ...] = ()
    global_sink: bool = False
    fresh_noise: bool = True

    def times(self) -> tuple[list[float], list[float] | None]:
        """The flow times the model is fed and, when they differ, the sigmas it is read with."""
        if self.warp:
            return flowmatch_schedule(list(self.steps), self.shift), None
        return flowmatch_nearest(list(self.steps), self.shift)


# Each from its project's inference config and pipeline code:
# - Self-Forcing: EMA weights (its README runs inference with --use_ema), [1000, 750, 500, 250]
#   warped at shift 5.
# - CausVid (configs/wan_causal_dmd.yaml, causal_inference.py): `generator`, [1000, 757, 522, 0]
#   at shift 8, not warped; the trailing 0 is dropped (it is the clean commit).
# - LongLive (configs/longlive_inference.yaml, longlive_interactive_inference.yaml): `generator`
#   plus its LoRA, Self-Forcing's steps; 3-frame chunks attending to a 12-frame window whose
#   first 3 frames are a sink (local_attn_size 12, sink_size 3: sink 1 chunk, then the 2 newest
#   chunks besides the one being made), global_sink true.
SAMPLING_PRESETS = {
    "self-forcing": SamplingPreset("generator_ema", (1000, 750, 500, 250), 5.0),
    "causvid": SamplingPreset("generator", (1000, 757, 522), 8.0, warp=False),
    "longlive": SamplingPreset(
        "generator",
        (1000, 750, 500, 250),
        5.0,
        args=(("frames_per_chunk", 3), ("sink_chunks", 1), ("window_chunks", 2)),
        global_sink=True,
    ),
}


def is_card(path: Path | str) -> bool:
    path = Path(path)
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == CARD_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def read_card(path: Path | str) -> ModelCard:
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the model card {path}: {e}") from e
    return card_from_dict(card, path)


def card_to_dict(card: ModelCard) -> dict:
    """A card as JSON with absolute paths and full args: what a quantized checkpoint records, so it
    finds its text encoder and VAE wherever it is copied (`card_from_dict` reads it back)."""
    sampling = next(name for name, p in SAMPLING_PRESETS.items() if p == card.sampling)
    out = {
        "format": CARD_FORMAT,
        "preset": card.preset,
        "args": card.args.to_dict(),
        "transformer": str(card.transformer.resolve()),
        "vae": str(card.vae.resolve()),
        "text_encoder": str(card.text_encoder.resolve()),
        "tokenizer": str(card.tokenizer.resolve()),
        "sampling": sampling,
    }
    if card.weights_key is not None:
        out["weights_key"] = card.weights_key
    if card.lora is not None:
        out["lora"] = {"file": str(card.lora.path.resolve()), "rank": card.lora.rank, "alpha": card.lora.alpha}
    return out


def card_from_dict(card: dict, path: Path) -> ModelCard:
    """A card's JSON -> ModelCard; relative paths are taken from `path`'s folder."""
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ValueError(f'{path} is not a model card (it needs "format": "{CARD_FORMAT}")')
    if "recipe" in card and "sampling" not in card:  # the key's name before sampling presets
        card = {**card, "sampling": card["recipe"]}
    required = ("preset", "transformer", "vae", "text_encoder", "tokenizer", "sampling")
    absent = [k for k in required if k not in card]
    if absent:
        raise ValueError(f"model card {path} lacks {', '.join(absent)}")
    preset = SAMPLING_PRESETS.get(card["sampling"])
    if preset is None:
        raise ValueError(
            f"model card {path}: unknown sampling preset {card['sampling']!r}; "
            f"choose one of {', '.join(SAMPLING_PRESETS)}"
        )
    try:
        args = replace(ModelArgs.from_name(card["preset"]), **{**dict(preset.args), **card.get("args", {})})
    except TypeError as e:
        raise ValueError(f"model card {path}: bad args ({e})") from e
    here = path.parent
    lora = None
    if "lora" in card:
        spec = card["lora"]
        if not isinstance(spec, dict) or {"file", "rank", "alpha"} - set(spec):
            raise ValueError(f"model card {path}: lora needs file, rank and alpha")
        lora = Lora(here / spec["file"], int(spec["rank"]), float(spec["alpha"]))
    return ModelCard(
        path=path,
        preset=card["preset"],
        args=args,
        transformer=here / card["transformer"],
        weights_key=card.get("weights_key", preset.weights_key),
        lora=lora,
        vae=here / card["vae"],
        text_encoder=here / card["text_encoder"],
        tokenizer=here / card["tokenizer"],
        sampling=preset,
    )


class CardParts:
    """A Wan model's parts besides its transformer: the card's text encoder (`text`, prompts ->
    UMT5 states, cached per prompt) and VAE (`decoder()`: one `StreamDecoder` per stream).

    Each is loaded when first used, on the transformer's device and dtype, and shared by every
    stream of the model and by copies of it (`copy.deepcopy` of the model shares them).
    """

    def __init__(self, card: ModelCard, device: str | torch.device, dtype: torch.dtype):
        self.card, self.device, self.dtype = card, device, dtype
        self.text = TextEncoder(card.text_encoder, card.tokenizer, card.args.text_len, device, dtype)
        self._vae = None

    def decoder(self) -> StreamDecoder:
        if self._vae is None:
            self._vae = load_vae(self.card.vae, self.device, self.dtype)
        return StreamDecoder(self._vae)

    def __deepcopy__(self, memo) -> CardParts:
        return self


def load_card_model(path: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> WorldModel:
    """The transformer a model card names, loaded strictly (eval mode); `model.card` is the card
    and `model.parts` its text encoder and VAE (`CardParts`)."""
    card = read_card(path)
    with torch.device("meta"):  # the checkpoint's tensors become the parameters: no random init to hold
        model = WorldModel(card.args).to(dtype)
    lora = card.lora
    load_checkpoint(
        model,
        card.transformer,
        card.weights_key,
        None if lora is None else lora.path,
        None if lora is None else lora.rank,
        None if lora is None else lora.alpha,
    )
    model.card = card
    model.parts = CardParts(card, device, dtype)
    return model.to(device=device, dtype=dtype).eval()
