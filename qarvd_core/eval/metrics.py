"""Frame metrics: PSNR, SSIM, camera shift by phase correlation, sharpness, palette error.

Frames are uint8 arrays [..., H, W, 3] unless stated otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from qarvd_core.world.simulator import ACTION_MOTION, BIOMES, TILE, _tile_images


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB per frame over the last three axes (capped at 100 dB for identical frames)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(-3, -2, -1))
    return np.minimum(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)), 100.0)


def _gaussian(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean SSIM per frame (Gaussian window 7, sigma 1.5, per channel, valid region)."""
    x = torch.from_numpy(a.reshape(-1, *a.shape[-3:])).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(b.reshape(-1, *b.shape[-3:])).permute(0, 3, 1, 2).double()
    w = _gaussian().double()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(z):
        return F.conv2d(z, w, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).numpy().reshape(a.shape[:-3])


def phase_correlation(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Phase-correlation surface [H, W]: entry (y, x) is high when cur(p) = prev(p - (y, x)).

    The agent sprite never moves on screen, so its square is blanked first: it would vote
    for "no motion" in every frame pair.
    """
    a = prev.astype(np.float64).mean(-1)
    b = cur.astype(np.float64).mean(-1)
    a, b = a - a.mean(), b - b.mean()
    c = a.shape[0] // 2 - TILE // 2
    a[c : c + TILE, c : c + TILE] = b[c : c + TILE, c : c + TILE] = 0
    r = np.fft.fft2(b) * np.conj(np.fft.fft2(a))
    return np.fft.ifft2(r / (np.abs(r) + 1e-9)).real


def camera_action(prev: np.ndarray, cur: np.ndarray) -> str:
    """The action whose camera motion best explains `prev` -> `cur`.

    Every tile has the same border, so the whole 8-px lattice correlates with itself; only
    the motions an action can make are compared, and the content decides between them.
    If the camera moves right by d, content moves left: cur(x) = prev(x + d).
    """
    corr = phase_correlation(prev, cur)
    scores = {
        name: corr[(-dy * TILE) % corr.shape[0], (-dx * TILE) % corr.shape[1]]
        for name, (dx, dy) in ACTION_MOTION.items()
    }
    return max(scores, key=scores.get)


def action_hits(frames: np.ndarray, actions: list[str]) -> np.ndarray:
    """hits[i-1] = the motion from frame i-1 to frame i matches action i (for i >= 1)."""
    return np.array([camera_action(frames[i - 1], frames[i]) == actions[i] for i in range(1, len(frames))])


def sharpness(frames: np.ndarray) -> np.ndarray:
    """Mean absolute gradient per frame: high for crisp tile edges, low for blur."""
    g = frames.astype(np.float64).mean(-1)
    return np.abs(np.diff(g, axis=-1)).mean(axis=(-2, -1)) + np.abs(np.diff(g, axis=-2)).mean(axis=(-2, -1))


def biome_palette(biome: str) -> np.ndarray:
    """Every colour the simulator draws in `biome`: [n, 3]."""
    b = BIOMES[biome]
    colours = _tile_images(b).reshape(-1, 3)
    extra = np.array([b.entity_rgb, (20, 20, 20)], np.uint8)
    return np.unique(np.concatenate([colours, extra]), axis=0)


def palette_error(frames: np.ndarray, biome: str) -> np.ndarray:
    """Mean distance (0-255 RGB units) from each pixel to the nearest colour of the biome."""
    pal = torch.from_numpy(biome_palette(biome)).double()
    px = torch.from_numpy(frames.reshape(-1, frames.shape[-3] * frames.shape[-2], 3)).double()
    d = torch.cdist(px, pal[None].expand(px.shape[0], -1, -1)).min(-1).values
    return d.mean(-1).numpy().reshape(frames.shape[:-3])
