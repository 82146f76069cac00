"""A procedural, deterministic, action-conditioned top-down tile world.

The camera moves one tile (= one 8-px patch) per frame in the commanded direction, so
motion is always visible: every tile has a darker border and a glyph, and moving entities
wander around. The world wraps around (a torus), so a stream never reaches an edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE = 8  # pixels per tile; equals the tiny presets' patch size
MAP_TILES = 64  # the world is MAP_TILES x MAP_TILES tiles and wraps around
N_ENTITIES = 96

ACTIONS: tuple[str, ...] = ("none", "up", "down", "left", "right")
# Camera motion per action, in tiles (dx, dy); +x is right, +y is down.
ACTION_MOTION: dict[str, tuple[int, int]] = {
    "none": (0, 0),
    "up": (0, -1),
    "down": (0, 1),
    "left": (-1, 0),
    "right": (1, 0),
}


@dataclass(frozen=True)
class Biome:
    name: str
    # Tile classes, from low to high terrain value: (base RGB, glyph RGB, glyph kind).
    tiles: tuple[tuple[tuple[int, int, int], tuple[int, int, int], str], ...]
    thresholds: tuple[float, ...]  # len(tiles) - 1 cut points on the smoothed noise in [0, 1]
    smoothness: int  # blur passes: more passes, larger regions
    entity_rgb: tuple[int, int, int]


BIOMES: dict[str, Biome] = {
    b.name: b
    for b in (
        Biome(
            "islands",
            (
                ((30, 70, 170), (70, 120, 215), "wave"),
                ((60, 140, 200), (120, 190, 230), "dot"),
                ((225, 205, 140), (190, 165, 100), "dot"),
                ((70, 160, 70), (30, 110, 40), "tree"),
            ),
            (0.45, 0.52, 0.58),
            3,
            (240, 80, 60),
        ),
        Biome(
            "desert",
            (
                ((230, 190, 120), (200, 155, 90), "wave"),
                ((210, 160, 95), (170, 120, 60), "dot"),
                ((150, 110, 80), (100, 70, 50), "rock"),
                ((90, 150, 70), (40, 100, 40), "cactus"),
            ),
            (0.42, 0.55, 0.66),
            2,
            (120, 60, 160),
        ),
        Biome(
            "forest",
            (
                ((60, 120, 50), (90, 160, 70), "dot"),
                ((35, 90, 35), (15, 60, 20), "tree"),
                ((110, 85, 50), (80, 60, 35), "rock"),
                ((70, 110, 160), (110, 150, 200), "wave"),
            ),
            (0.45, 0.6, 0.7),
            3,
            (230, 200, 40),
        ),
        Biome(
            "snow",
            (
                ((235, 240, 250), (190, 200, 220), "dot"),
                ((170, 210, 235), (120, 170, 210), "wave"),
                ((120, 130, 140), (80, 90, 100), "rock"),
                ((40, 90, 70), (220, 230, 235), "tree"),
            ),
            (0.5, 0.6, 0.7),
            2,
            (200, 40, 40),
        ),
    )
}
BIOME_NAMES: tuple[str, ...] = tuple(BIOMES)


def _glyph_mask(kind: str) -> np.ndarray:
    m = np.zeros((TILE, TILE), bool)
    if kind == "dot":
        m[3:5, 3:5] = True
    elif kind == "wave":
        m[3, 1:3] = m[4, 3:5] = m[3, 5:7] = True
    elif kind == "tree":
        m[2:5, 2:6] = True
        m[5:7, 3:5] = True
    elif kind == "rock":
        m[3:6, 2:6] = True
        m[2, 3:5] = True
    elif kind == "cactus":
        m[1:7, 3:5] = True
        m[3, 1:3] = m[2, 5:7] = True
    else:
        raise ValueError(f"unknown glyph {kind!r}")
    return m


def _tile_images(biome: Biome) -> np.ndarray:
    """[n_classes, TILE, TILE, 3] uint8: base colour, darker border, glyph."""
    out = np.zeros((len(biome.tiles), TILE, TILE, 3), np.uint8)
    for i, (base, glyph, kind) in enumerate(biome.tiles):
        img = np.empty((TILE, TILE, 3), np.float32)
        img[:] = base
        border = (np.asarray(base, np.float32) * 0.7).astype(np.float32)
        img[0, :] = img[:, 0] = border
        img[_glyph_mask(kind)] = glyph
        out[i] = img.clip(0, 255).astype(np.uint8)
    return out


_AGENT = np.zeros((TILE, TILE), bool)
_AGENT[1:7, 2:6] = True
_AGENT[2:6, 1:7] = True


def _terrain(rng: np.random.Generator, biome: Biome) -> np.ndarray:
    """Smoothed value noise on the torus, rank-normalised to [0, 1]."""
    field = rng.random((MAP_TILES, MAP_TILES))
    for _ in range(biome.smoothness):
        field = sum(np.roll(field, s, axis=a) for a in (0, 1) for s in (-1, 1)) / 4 * 0.6 + field * 0.4
    ranks = field.ravel().argsort().argsort().reshape(field.shape)
    return ranks / (field.size - 1)


class World:
    """One seeded world. `step(action)` moves the camera and entities and renders a frame."""

    def __init__(self, biome: str, seed: int, frame_tiles: int = 8):
        if biome not in BIOMES:
            raise ValueError(f"unknown biome {biome!r}; choose one of {', '.join(BIOME_NAMES)}")
        self.biome = BIOMES[biome]
        self.seed = seed
        self.frame_tiles = frame_tiles
        rng = np.random.default_rng(seed)
        noise = _terrain(rng, self.biome)
        self.tile_map = np.searchsorted(np.asarray(self.biome.thresholds), noise).astype(np.int64)
        self.tile_images = _tile_images(self.biome)
        self.entities = rng.integers(0, MAP_TILES, size=(N_ENTITIES, 2))  # (x, y) in tiles
        self._rng = np.random.default_rng(seed + 1)
        self.camera = np.array([0, 0], np.int64)  # top-left tile (x, y)

    @property
    def frame_size(self) -> int:
        return self.frame_tiles * TILE

    def render(self) -> np.ndarray:
        """The current view, [H, W, 3] uint8."""
        n = self.frame_tiles
        xs = (self.camera[0] + np.arange(n)) % MAP_TILES
        ys = (self.camera[1] + np.arange(n)) % MAP_TILES
        tiles = self.tile_map[np.ix_(ys, xs)]  # [n, n]
        frame = self.tile_images[tiles]  # [n, n, T, T, 3]
        frame = frame.transpose(0, 2, 1, 3, 4).reshape(n * TILE, n * TILE, 3).copy()
        for ex, ey in self.entities:
            tx = (ex - self.camera[0]) % MAP_TILES
            ty = (ey - self.camera[1]) % MAP_TILES
            if tx < n and ty < n:
                frame[ty * TILE + 2 : ty * TILE + 6, tx * TILE + 2 : tx * TILE + 6] = self.biome.entity_rgb
        c = n * TILE // 2 - TILE // 2  # the agent stays in the middle of the screen
        frame[c : c + TILE, c : c + TILE][_AGENT] = (20, 20, 20)
        return frame

    def step(self, action: str) -> np.ndarray:
        """Apply one frame's action, move entities, and return the new frame."""
        if action not in ACTION_MOTION:
            raise ValueError(f"unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
        dx, dy = ACTION_MOTION[action]
        self.camera = (self.camera + (dx, dy)) % MAP_TILES
        moves = self._rng.integers(0, 5, size=N_ENTITIES)  # 0 stays; 1-4 move one tile
        steps = np.array([(0, 0), (0, -1), (0, 1), (-1, 0), (1, 0)])[moves]
        walking = self._rng.random(N_ENTITIES) < 0.3
        self.entities = (self.entities + steps * walking[:, None]) % MAP_TILES
        return self.render()


def rollout(biome: str, seed: int, actions: list[str], start: tuple[int, int] | None = None) -> dict:
    """Frames [T, H, W, 3] uint8 for `actions` (frame i shown after action i), with camera truth.

    `offsets[i]` is the camera motion (dx, dy) in pixels from frame i-1 to frame i.
    """
    world = World(biome, seed)
    if start is not None:
        world.camera = np.asarray(start, np.int64) % MAP_TILES
    frames, offsets, positions = [], [], []
    for a in actions:
        frames.append(world.step(a))
        dx, dy = ACTION_MOTION[a]
        offsets.append((dx * TILE, dy * TILE))
        positions.append(tuple(int(v) for v in world.camera))
    return {
        "frames": np.stack(frames),
        "offsets": np.asarray(offsets, np.int64),
        "camera": np.asarray(positions, np.int64),
    }
