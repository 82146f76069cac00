"""Text prompts for Wan models: UMT5 encoder states, as Wan's pipelines make them.

A prompt is cleaned (diffusers' `prompt_clean`: ftfy when installed, HTML entities, whitespace),
tokenized with the end-of-sequence token, padded or cut to `text_len` (512 for Wan) and run
through transformers' `UMT5EncoderModel`; the states past the prompt's tokens are set to zero.
Both come from local folders, e.g. `Wan2.1-T2V-1.3B-Diffusers/text_encoder` and `.../tokenizer`.

The encoder (UMT5-XXL: 5.7 B parameters) is needed only when a prompt is new: the states of the
`cache_size` most recent prompts are kept (8 MB each at 512 x 4096 in float32), and `release()`
drops the encoder from memory; the next new prompt loads it again.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor


class TextEncoder:
    """Prompts -> UMT5 states [B, text_len, d_model], zero past each prompt; each prompt encoded once."""

    def __init__(
        self,
        encoder_dir: Path | str,
        tokenizer_dir: Path | str,
        text_len: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 16,
    ):
        self.encoder_dir, self.tokenizer_dir = Path(encoder_dir), Path(tokenizer_dir)
        self.text_len, self.device, self.dtype = text_len, torch.device(device), dtype
        self.cache_size = cache_size
        self._states: OrderedDict[str, Tensor] = OrderedDict()
        self._encoder = None
        self._tokenizer = None

    def __call__(self, prompts: list[str]) -> Tensor:
        new = list(dict.fromkeys(p for p in prompts if p not in self._states))
        if new:
            for prompt, states in zip(new, self._encode(new)):
                self._states[prompt] = states
        for p in prompts:
            self._states.move_to_end(p)
        out = torch.stack([self._states[p] for p in prompts])
        while len(self._states) > self.cache_size:
            self._states.popitem(last=False)
        return out

    def release(self) -> None:
        """Drop the encoder's weights; prompts already encoded stay available."""
        self._encoder = None

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokenizer, encoder = self._load()
        tokens = tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        states = encoder(tokens.input_ids.to(self.device), mask).last_hidden_state
        return states.masked_fill(mask[..., None] == 0, 0)

    def _load(self):
        from transformers import AutoTokenizer, UMT5EncoderModel

        for what, folder in (("text encoder", self.encoder_dir), ("tokenizer", self.tokenizer_dir)):
            if not folder.is_dir():
                raise ValueError(
                    f"no {what} folder at {folder}: point the model card at the {folder.name}/ folder "
                    "of a Wan2.1-T2V-1.3B-Diffusers download"
                )
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
        if self._encoder is None:
            self._encoder = (
                UMT5EncoderModel.from_pretrained(self.encoder_dir, dtype=self.dtype, local_files_only=True)
                .to(self.device)
                .eval()
            )
        return self._tokenizer, self._encoder
