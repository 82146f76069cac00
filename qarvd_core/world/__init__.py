"""The procedural world: data for training, prompts for calibration, truth for evaluation."""

from qarvd_core.world.scripts import SPLITS, Scenario, format_actions, parse_actions, scenarios
from qarvd_core.world.simulator import ACTION_MOTION, ACTIONS, BIOME_NAMES, BIOMES, TILE, World, rollout

__all__ = [
    "ACTIONS",
    "ACTION_MOTION",
    "BIOMES",
    "BIOME_NAMES",
    "SPLITS",
    "TILE",
    "Scenario",
    "World",
    "format_actions",
    "parse_actions",
    "rollout",
    "scenarios",
]
