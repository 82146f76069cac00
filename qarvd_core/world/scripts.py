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

_TOKEN = re.compile(r"^\s*([a-z]+)\s*(?:\*\s*([0-9]+))?\s*$")
# A count this long is more frames than anything could render; refusing it unread keeps the
# total's arithmetic small however many digits a script holds.
_MAX_COUNT_DIGITS = 18


def parse_actions(script: str, max_frames: int | None = None) -> list[str]:
    """'right*24,down*3,none' -> one action per frame. Raises ValueError naming the bad part.

    The total length is checked against `max_frames` from the counts before any list is built,
    so a short script asking for billions of frames costs nothing: pass a limit for untrusted input.
    """
    if not script or not script.strip():
        raise ValueError("empty action script; write e.g. 'right*24,down*24'")
    runs: list[tuple[str, int]] = []
    for part in script.split(","):
        m = _TOKEN.match(part)
        if not m:
            raise ValueError(f"malformed action {_excerpt(part)}; write ACTION or ACTION*COUNT, e.g. 'left*8'")
        name, digits = m.group(1), (m.group(2) or "1").lstrip("0") or "0"
        if name not in ACTIONS:
            raise ValueError(f"unknown action {_excerpt(name)} in {_excerpt(part)}; choose one of {', '.join(ACTIONS)}")
        if len(digits) > _MAX_COUNT_DIGITS:
            limit = f"the limit of {max_frames}" if max_frames is not None else f"{_MAX_COUNT_DIGITS} digits"
            raise ValueError(f"count in {_excerpt(part)} is over {limit}; use a smaller count")
        count = int(digits)
        if count < 1:
            raise ValueError(f"count must be >= 1 in {_excerpt(part)}")
        runs.append((name, count))
    total = sum(count for _, count in runs)
    if max_frames is not None and total > max_frames:
        raise ValueError(f"{total} frames is over the limit of {max_frames}; use a shorter script")
    return [name for name, count in runs for _ in range(count)]


def _excerpt(text: str, limit: int = 40) -> str:
    """`text` quoted, cut short so an error message never repeats a long input."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


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
