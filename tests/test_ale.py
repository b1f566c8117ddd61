"""Tests of the Atari frame generator (space/data/ale.py); skipped without ale-py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from space.data import ale
from space.data.ale import generate_atari, rom_name
from space.data.datasets import AtariDataset

SMALL = dict(num_train=3, num_val=2, num_test=2, spacing=3, warmup=60, progress=False)


def frames(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asarray(Image.open(p)) for p in sorted(root.rglob("*.png"))}


def test_rom_names() -> None:
    assert rom_name("MsPacman-v0") == "ms_pacman"
    assert rom_name("MontezumaRevenge") == "montezuma_revenge"
    assert rom_name("SpaceInvaders") == "space_invaders"
    assert rom_name("Qbert") == "qbert"


def test_missing_ale_py_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ale_py", None)  # makes `import ale_py` raise ImportError
    with pytest.raises(ImportError, match=r"pip install ale-py==0\.12\.1"):
        generate_atari(tmp_path / "ATARI", games=["Pong"], **SMALL)


def test_two_games_layout_determinism_and_loading(tmp_path: Path) -> None:
    pytest.importorskip("ale_py")
    root = generate_atari(tmp_path / "ATARI", games=["SpaceInvaders", "Qbert-v0"], seed=1, **SMALL)
    assert sorted(p.name for p in root.iterdir()) == ["Qbert-v0", "SpaceInvaders-v0"]
    for game in ("Qbert-v0", "SpaceInvaders-v0"):
        for split, n in (("train", 3), ("validation", 2), ("test", 2)):
            assert sorted(p.name for p in (root / game / split).iterdir()) == [f"{i}.png" for i in range(n)]
    a = frames(root)
    frame = a["SpaceInvaders-v0/train/0.png"]
    assert frame.shape == (210, 160, 3) and frame.dtype == np.uint8 and frame.std() > 0
    # Samples are spaced apart and repeats skipped, so consecutive frames differ.
    for game in ("Qbert-v0", "SpaceInvaders-v0"):
        train = [a[f"{game}/train/{i}.png"] for i in range(3)]
        assert not any(np.array_equal(x, y) for x, y in zip(train, train[1:]))
    # Same seed: identical frames, also for a subset of the games; bgr swaps R and B.
    again = generate_atari(tmp_path / "again", games=["SpaceInvaders"], seed=1, bgr=True, **SMALL)
    for name, image in frames(again).items():
        np.testing.assert_array_equal(image, a[name][:, :, ::-1])
    other = generate_atari(tmp_path / "other", games=["Qbert"], seed=2, **SMALL)
    assert any(not np.array_equal(image, a[name]) for name, image in frames(other).items())

    dataset = AtariDataset(root, "val", games=["Qbert"])
    assert len(dataset) == 2 and dataset[0].shape == (3, 128, 128)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_game_leaves_previous_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    pytest.importorskip("ale_py")
    root = generate_atari(tmp_path / "ATARI", games=["Pong"], **SMALL)
    before = frames(root)

    def broken_play(*args, **kwargs):
        yield np.zeros((210, 160, 3), np.uint8)
        raise KeyboardInterrupt

    monkeypatch.setattr(ale, "_play", broken_play)
    with pytest.raises(KeyboardInterrupt):
        generate_atari(root, games=["Pong"], seed=5, **SMALL)
    assert {k: v.tobytes() for k, v in frames(root).items()} == {k: v.tobytes() for k, v in before.items()}
    assert sorted(p.name for p in root.iterdir()) == ["Pong-v0"]
    (root / ".Pong-v0.tmp-k1ll3d").mkdir()  # what SIGKILL leaves, where no handler runs
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="space.data.ale"):
        generate_atari(root, games=["Pong"], **SMALL)
    assert ".Pong-v0.tmp-k1ll3d: left by a generation that was stopped" in caplog.text


def test_invalid_arguments(tmp_path: Path) -> None:
    pytest.importorskip("ale_py")
    with pytest.raises(ValueError, match="Unknown game"):
        generate_atari(tmp_path, games=["NotAGame"], **SMALL)
    with pytest.raises(ValueError, match="frame_skip"):
        generate_atari(tmp_path, games=["Pong"], frame_skip=(4, 2), **SMALL)
    with pytest.raises(TypeError):
        generate_atari(tmp_path, games="Pong", **SMALL)
