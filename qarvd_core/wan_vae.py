"""Streaming decode of Wan latents to frames with diffusers' `AutoencoderKLWan`.

The Wan VAE's decoder is causal in time: each latent frame is decoded with a cache of the
previous frames' features (the last two frames at every causal convolution), the first latent
frame giving one video frame and every later one four. diffusers' `decode()` clears that cache
at each call, so decoding a stream chunk by chunk through it would restart the video at every
chunk. `StreamDecoder` drives the decoder the way `decode()` does, one latent frame at a time,
but keeps the cache between calls: one decoder per stream, and a 3-frame latent chunk becomes
9 frames, then 12 per chunk, exactly the frames a one-shot decode of the whole video gives.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor


def load_vae(folder: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """diffusers' `AutoencoderKLWan` from a local folder (e.g. `Wan2.1-T2V-1.3B-Diffusers/vae`), eval mode."""
    from diffusers import AutoencoderKLWan

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"no VAE at {folder} (it needs config.json and the weights): point the model card at the vae/ folder "
            "of a Wan2.1-T2V-1.3B-Diffusers download"
        )
    return AutoencoderKLWan.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device).eval()


class StreamDecoder:
    """Decodes one stream's normalised latent chunks [B, F, C, h, w] to frames [B, F', 3, H, W] in [-1, 1]."""

    def __init__(self, vae):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.vae = vae
        config = vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        # The transformer works on latents normalised per channel, (z - mean) / std.
        self.mean = torch.tensor(config.latents_mean).view(shape)
        self.std = torch.tensor(config.latents_std).view(shape)
        # Pixels per latent cell, and video frames per latent frame past the first (8 and 4 for Wan 2.1).
        self.scale = 2 ** (len(config.dim_mult) - 1) * (config.patch_size or 1)
        self.frames_per_latent = 2 ** sum(config.temperal_downsample)
        self._n_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        """Start a new video: the next chunk's first latent frame is decoded as the first."""
        self.cache: list = [None] * self._n_convs
        self.latent_frames = 0

    def copy(self) -> StreamDecoder:
        """A decoder that continues from this one's state independently (same VAE). diffusers
        replaces cache entries and never writes into them, so sharing the tensors is a copy."""
        twin = copy.copy(self)
        twin.cache = list(self.cache)
        return twin

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        z = latents.transpose(1, 2).to(dtype)
        z = z * self.std.to(z) + self.mean.to(z)
        x = vae.post_quant_conv(z)  # 1x1x1: no temporal context
        frames = []
        for i in range(x.shape[2]):
            first = self.latent_frames == 0
            frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=self.cache, feat_idx=[0], first_chunk=first))
            self.latent_frames += 1
        return torch.cat(frames, 2).clamp(-1, 1).transpose(1, 2)
