import numpy as np
import pytest

from qarvd_core.video import encode_mp4, read_mp4, write_mp4, write_pngs


def test_mp4_decodes_with_right_count_and_size(tmp_path):
    rng = np.random.default_rng(0)
    frames = (rng.random((13, 64, 64, 3)) * 255).astype(np.uint8)
    out = write_mp4(frames, tmp_path / "v.mp4", fps=10, scale=2)
    video = read_mp4(out)
    assert video.shape == (13, 128, 128, 3)
    assert not list(tmp_path.glob(".*part"))
    assert out.read_bytes() == encode_mp4(iter(frames), fps=10, scale=2)  # the file is the encoder's bytes


def test_empty_video_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_mp4(iter([]), tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


def test_pngs_are_lossless(tmp_path):
    from PIL import Image

    frames = (np.random.default_rng(1).random((3, 16, 16, 3)) * 255).astype(np.uint8)
    write_pngs(frames, tmp_path / "f")
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "f" / "000002.png")), frames[2])
