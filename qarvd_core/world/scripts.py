"""Action scripts: the text format, scripted policies, and the data splits.

Seeds are split by range so that training and calibration never see a held-out world:
train [0, 900000), calibration [900000, 950000), held-out [950000, 1000000).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from qarvd_core.world.simulator import ACTIONS, BIOME_NAMES

SPLITS: dict[str, range] = {
    "train": range(0, 900_000),
    "calibration": range(900_000, 950_000),
    "heldout": range(950_000, 1_000_000),
}

_TOKEN = re.compile(r"^\s*([a-z]+)\s*(?:\*\s*(\d+))?\s*$")


def parse_actions(script: str) -> list[str]:
    """'right*24,down*3,none' -> one action per frame. Raises ValueError naming the bad part."""
    if not script or not script.strip():
        raise ValueError("empty action script; write e.g. 'right*24,down*24'")
    out: list[str] = []
    for part in script.split(","):
        m = _TOKEN.match(part)
        if not m:
            raise ValueError(f"malformed action {part!r}; write ACTION or ACTION*COUNT, e.g. 'left*8'")
        name, count = m.group(1), int(m.group(2) or 1)
        if name not in ACTIONS:
            raise ValueError(f"unknown action {name!r} in {part!r}; choose one of {', '.join(ACTIONS)}")
        if count < 1:
            raise ValueError(f"count must be >= 1 in {part!r}")
        out.extend([name] * count)
    return out


def format_actions(actions: list[str]) -> str:
    """Inverse of parse_actions, run-length encoded."""
    parts: list[str] = []
    i = 0
    while i < len(actions):
        j = i
        while j < len(actions) and actions[j] == actions[i]:
            j += 1
        parts.append(actions[i] if j - i == 1 else f"{actions[i]}*{j - i}")
        i = j
    return ",".join(parts)


def random_walk(rng: np.random.Generator, n: int, hold: tuple[int, int] = (2, 10)) -> list[str]:
    """Hold a random action (none included) for a random number of frames, then switch."""
    out: list[str] = []
    while len(out) < n:
        out += [ACTIONS[rng.integers(len(ACTIONS))]] * int(rng.integers(hold[0], hold[1] + 1))
    return out[:n]


def patrol(rng: np.random.Generator, n: int) -> list[str]:
    """Back and forth along one axis."""
    a, b = (("left", "right"), ("up", "down"))[rng.integers(2)]
    leg = int(rng.integers(3, 9))
    out: list[str] = []
    while len(out) < n:
        out += [a] * leg + [b] * leg
    return out[:n]


def go_and_return(rng: np.random.Generator, n: int) -> list[str]:
    """Go one way, wait, come back the same way (revisits what was shown before)."""
    a, b = (("left", "right"), ("right", "left"), ("up", "down"), ("down", "up"))[rng.integers(4)]
    leg = int(rng.integers(3, 7))
    out: list[str] = []
    while len(out) < n:
        out += [a] * leg + ["none"] * 2 + [b] * leg + ["none"] * 2
    return out[:n]


POLICIES = {"random_walk": random_walk, "patrol": patrol, "go_and_return": go_and_return}


@dataclass(frozen=True)
class Scenario:
    """One repeatable evaluation or calibration case: a world, a noise seed and actions."""

    biome: str
    world_seed: int
    noise_seed: int
    actions: tuple[str, ...]
    policy: str


def scenarios(split: str, count: int, frames: int, offset: int = 0) -> list[Scenario]:
    """`count` deterministic scenarios from `split`, cycling through biomes and policies."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    seeds = SPLITS[split]
    out = []
    for i in range(offset, offset + count):
        seed = seeds[(i * 7919) % len(seeds)]
        rng = np.random.default_rng(seed)
        policy = tuple(POLICIES)[i % len(POLICIES)]
        out.append(
            Scenario(
                biome=BIOME_NAMES[i % len(BIOME_NAMES)],
                world_seed=seed,
                noise_seed=seed + 17,
                actions=tuple(POLICIES[policy](rng, frames)),
                policy=policy,
            )
        )
    return out
