import tracemalloc

import pytest

from qarvd_core.world import SPLITS, format_actions, parse_actions, scenarios


def test_parse_and_format_round_trip():
    acts = parse_actions("right*3, down ,none*2")
    assert acts == ["right"] * 3 + ["down"] + ["none"] * 2
    assert parse_actions(format_actions(acts)) == acts


@pytest.mark.parametrize("bad", ["", "jump*3", "right*", "right*0", "left*2,,up", "right*-1"])
def test_malformed_scripts_raise_with_a_hint(bad):
    with pytest.raises(ValueError):
        parse_actions(bad)


def test_splits_are_disjoint_and_heldout_is_never_training():
    train, cal, held = (set(SPLITS[k]) for k in ("train", "calibration", "heldout"))
    assert not (train & cal) and not (train & held) and not (cal & held)
    for sc in scenarios("heldout", 12, 24):
        assert sc.world_seed in SPLITS["heldout"] and len(sc.actions) == 24
    assert scenarios("heldout", 5, 9) == scenarios("heldout", 5, 9)
    assert {s.policy for s in scenarios("calibration", 6, 9)} == {"random_walk", "patrol", "go_and_return"}
    with pytest.raises(ValueError, match="split"):
        scenarios("test", 1, 3)


def test_length_is_checked_before_anything_is_expanded():
    """A 14-character script asking for 10^8 frames (or 10^40) is refused without building a list."""
    tracemalloc.start()
    try:
        for script in ("none*100000000", "right*3,none*" + "9" * 40, ",".join(["up*1000"] * 200)):
            with pytest.raises(ValueError, match="over the limit of 600"):
                parse_actions(script, max_frames=600)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"refusing an over-long script allocated {peak} bytes"
    with pytest.raises(ValueError, match="100000000 frames is over the limit of 600"):
        parse_actions("none*100000000", max_frames=600)
    assert parse_actions("none*598,left*2", max_frames=600) == ["none"] * 598 + ["left"] * 2
    with pytest.raises(ValueError, match="digits"):
        parse_actions("none*" + "9" * 5000)


def test_errors_quote_only_an_excerpt_of_a_long_script():
    with pytest.raises(ValueError) as e:
        parse_actions("x" * 10_000 + "!")
    assert len(str(e.value)) < 200
