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
