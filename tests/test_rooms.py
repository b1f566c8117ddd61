"""Tests of the procedural 3D-room generator (space/data/rooms.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from space.data import rooms
from space.data.datasets import Obj3dDataset
from space.data.rooms import generate_rooms, image_seed, render_room


def expected_boxes(id_map: np.ndarray) -> np.ndarray:
    """Tight cx, cy, w, h pixel boxes of each object id in the map, in id order."""
    boxes = []
    for k in sorted(set(np.unique(id_map).tolist()) - {-1}):
        ys, xs = np.nonzero(id_map == k)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        boxes.append([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("seed", range(12))
def test_boxes_are_tight_around_visible_pixels(seed: int) -> None:
    image, id_map, boxes = render_room(np.random.default_rng(seed), image_size=96, max_objects=6)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert id_map.shape == (96, 96) and id_map.min() >= -1
    np.testing.assert_array_equal(boxes, expected_boxes(id_map))
    assert len(boxes) >= 1, "the nearest object can never be hidden"


def test_render_is_deterministic_and_varied() -> None:
    a = render_room(np.random.default_rng(3))
    b = render_room(np.random.default_rng(3))
    c = render_room(np.random.default_rng(4))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    # Floor, walls and objects give many distinct colours, not a flat image.
    assert len(np.unique(a[0].reshape(-1, 3), axis=0)) > 50


def test_objects_are_shaded_and_cast_shadows() -> None:
    # Over a few scenes, object pixels vary in brightness (Lambert) and the
    # floor has darker (shadowed) pixels than its lit maximum.
    darkest_floor_ratio = []
    for seed in range(5):
        image, id_map, _ = render_room(np.random.default_rng(seed), supersample=1)
        brightness = image.astype(float).sum(axis=-1)
        for k in np.unique(id_map[id_map >= 0]):
            pixels = brightness[id_map == k]
            if pixels.size > 30:
                assert pixels.max() > 1.15 * pixels.min()
        background = brightness[id_map == -1]
        darkest_floor_ratio.append(np.percentile(background, 2) / np.percentile(background, 98))
    assert min(darkest_floor_ratio) < 0.75


def test_object_size_follows_min_max_size() -> None:
    sides = []
    for seed in range(40):
        _, id_map, boxes = render_room(np.random.default_rng(seed), image_size=64, min_objects=1, max_objects=1,
                                       min_size=0.2, max_size=0.2)
        on_border = (id_map[[0, -1]] >= 0).any() or (id_map[:, [0, -1]] >= 0).any()
        if not on_border:
            sides.append(boxes[0, 2:].max() / 64)
    # One object, nothing hides it: the larger side of its box is about 0.2 of the image.
    assert len(sides) > 30
    assert 0.18 <= np.median(sides) <= 0.22
    assert 0.16 <= min(sides) and max(sides) <= 0.25


def test_generate_rooms_layout_meta_and_determinism(tmp_path: Path) -> None:
    kwargs = dict(image_size=48, num_train=3, num_val=2, num_test=2, seed=7, num_workers=1, progress=False)
    a = generate_rooms(tmp_path / "a", **kwargs)
    b = generate_rooms(tmp_path / "b", **kwargs)
    files_a, files_b = tree_bytes(a), tree_bytes(b)
    assert files_a == files_b
    expected = {"meta.json"}
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        expected |= {f"{split}/{i}-room.png" for i in range(n)} | {f"{split}/bb/bb_{i}.txt" for i in range(n)}
    assert set(files_a) == expected
    meta = json.loads((a / "meta.json").read_text())
    assert meta["image_size"] == 48 and meta["counts"] == {"train": 3, "val": 2, "test": 2}
    assert meta["params"]["seed"] == 7
    with Image.open(a / "val" / "1-room.png") as image:
        assert image.size == (48, 48) and image.mode == "RGB"
    # No temporary folders left next to the datasets.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    c = generate_rooms(tmp_path / "c", **dict(kwargs, seed=8))
    assert tree_bytes(c)["train/0-room.png"] != files_a["train/0-room.png"]


def test_images_do_not_depend_on_order_or_workers(tmp_path: Path) -> None:
    kwargs = dict(image_size=32, num_train=5, num_val=1, num_test=1, seed=1, progress=False)
    one = generate_rooms(tmp_path / "one", num_workers=1, **kwargs)
    two = generate_rooms(tmp_path / "two", num_workers=2, **kwargs)
    assert tree_bytes(one) == tree_bytes(two)
    # Image 4 of train alone, from its own seed, is the same picture.
    image, _, _ = render_room(np.random.Generator(np.random.PCG64(image_seed(1, "train", 4))), image_size=32)
    np.testing.assert_array_equal(np.asarray(Image.open(one / "train" / "4-room.png")), image)


def test_dataset_boxes_match_id_map(tmp_path: Path) -> None:
    root = generate_rooms(tmp_path / "rooms", image_size=64, num_train=1, num_val=4, num_test=1, seed=5,
                          num_workers=1, progress=False)
    dataset = Obj3dDataset(root, "val", image_size=64)
    assert len(dataset) == 4 and dataset.has_boxes and dataset.box_pixel_size == 64
    for i in range(4):
        image, id_map, _ = render_room(np.random.Generator(np.random.PCG64(image_seed(5, "val", i))), image_size=64)
        np.testing.assert_array_equal(dataset[i].numpy(), image.transpose(2, 0, 1) / np.float32(255))
        cx, cy, w, h = expected_boxes(id_map).T
        normalised = np.stack([cy - h / 2, cy + h / 2, cx - w / 2, cx + w / 2], axis=1) / 64
        np.testing.assert_array_equal(dataset.boxes(i, dtype=np.float64), normalised)


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = generate_rooms(tmp_path / "rooms", image_size=32, num_train=2, num_val=1, num_test=1, num_workers=1,
                         progress=False)
    before = tree_bytes(old)
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render_room(*args, **kwargs)

    monkeypatch.setattr(rooms, "render_room", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate_rooms(tmp_path / "rooms", image_size=32, num_train=5, num_val=1, num_test=1, seed=9,
                       num_workers=1, progress=False)
    assert tree_bytes(old) == before, "the previous dataset must survive an interrupted run"
    assert [p.name for p in tmp_path.iterdir()] == ["rooms"]
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        generate_rooms(tmp_path / "fresh", image_size=32, num_train=5, num_val=1, num_test=1, num_workers=1,
                       progress=False)
    assert not (tmp_path / "fresh").exists()


def test_regenerating_replaces_the_old_dataset(tmp_path: Path) -> None:
    root = tmp_path / "rooms"
    generate_rooms(root, image_size=32, num_train=3, num_val=1, num_test=1, num_workers=1, progress=False)
    (root / "train" / "stray.txt").write_text("old")
    generate_rooms(root, image_size=32, num_train=1, num_val=1, num_test=1, num_workers=1, progress=False)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["0-room.png", "bb"]
    assert [p.name for p in tmp_path.iterdir()] == ["rooms"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_objects=0), "min_objects"),
        (dict(min_objects=3, max_objects=2), "min_objects"),
        (dict(min_size=0.3, max_size=0.2), "min_size"),
        (dict(num_train=-1), "counts"),
        (dict(image_size=4), "image_size"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_rooms(tmp_path / "rooms", **kwargs)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("seed", range(4))
def test_without_shadows_only_the_shadows_change(seed: int) -> None:
    lit, lit_ids, lit_boxes = render_room(np.random.default_rng(seed), image_size=64, max_objects=4)
    flat, flat_ids, flat_boxes = render_room(np.random.default_rng(seed), image_size=64, max_objects=4,
                                             shadows=False)
    np.testing.assert_array_equal(lit_ids, flat_ids)  # same scene, same objects, same boxes
    np.testing.assert_array_equal(lit_boxes, flat_boxes)
    darker = lit.astype(int) - flat.astype(int)
    assert darker.max() <= 1, "a shadow can only darken a pixel (1 for rounding at antialiased edges)"
    assert (darker.sum(-1) < -30).sum() > 10, "the shadowed render has visible shadows"


def render_pair(seed: int, **style: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A room rendered with the generator's default style and with ``style``: (default image,
    styled image, object ids). The style changes colours only: ids and boxes must be the same."""
    base, base_ids, base_boxes = render_room(np.random.default_rng(seed), image_size=64, max_objects=4,
                                             shadows=False)
    styled, ids, boxes = render_room(np.random.default_rng(seed), image_size=64, max_objects=4,
                                     shadows=False, **style)
    np.testing.assert_array_equal(base_ids, ids)  # same layout, shapes and boxes
    np.testing.assert_array_equal(base_boxes, boxes)
    return base, styled, ids


@pytest.mark.parametrize("seed", range(4))
def test_muted_palette_keeps_the_scene_and_sets_objects_apart(seed: int) -> None:
    """'muted': same layout as 'full'; greyish room, saturated objects."""
    full, muted, muted_ids = render_pair(seed, palette="muted")
    assert not np.array_equal(full, muted)

    def saturation(rgb: np.ndarray) -> np.ndarray:
        rgb = rgb.astype(np.float64)
        top = rgb.max(-1)
        return np.where(top > 0, (top - rgb.min(-1)) / np.maximum(top, 1), 0.0)

    sat = saturation(muted)
    room, objects = sat[muted_ids == -1], sat[muted_ids >= 0]
    assert np.percentile(room, 95) <= 0.2, "floor and walls are greyish (antialiased edges aside)"
    assert np.median(objects) >= 0.6, "objects are saturated"


def test_unknown_palette_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="palette must be one of"):
        generate_rooms(tmp_path / "rooms", image_size=16, num_train=1, num_val=1, num_test=1, palette="neon")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("seed", range(4))
def test_vivid_palette_changes_only_the_object_colours(seed: int) -> None:
    full, vivid, full_ids = render_pair(seed, palette="vivid")
    inner = np.ones_like(full_ids, bool)  # away from antialiased edges
    inner[1:] &= full_ids[1:] == full_ids[:-1]
    inner[:-1] &= full_ids[:-1] == full_ids[1:]
    inner[:, 1:] &= full_ids[:, 1:] == full_ids[:, :-1]
    inner[:, :-1] &= full_ids[:, :-1] == full_ids[:, 1:]
    room = (full_ids == -1) & inner
    np.testing.assert_array_equal(full[room], vivid[room])  # floor and walls as in 'full'
    assert not np.array_equal(full[full_ids >= 0], vivid[full_ids >= 0])


@pytest.mark.parametrize("seed", range(4))
def test_flat_walls_are_one_colour_and_keep_the_scene(seed: int) -> None:
    shaded, flat, flat_ids = render_pair(seed, walls="flat")
    top = flat[:3][flat_ids[:3] == -1]  # the top rows show walls only (back and sides)
    assert len(np.unique(top, axis=0)) == 1, "flat walls are a single colour"
    assert len(np.unique(shaded[:3][flat_ids[:3] == -1], axis=0)) > 1, "shaded walls vary"
    bottom = flat_ids[-3:] == -1  # the floor is shaded as before
    np.testing.assert_array_equal(flat[-3:][bottom], shaded[-3:][bottom])
    with pytest.raises(ValueError, match="walls must be one of"):
        render_room(np.random.default_rng(seed), image_size=16, walls="plain")


@pytest.mark.parametrize("seed", range(4))
def test_back_wall_only_hides_the_side_walls(seed: int) -> None:
    image, ids, boxes = render_room(np.random.default_rng(seed), image_size=64, max_objects=4, shadows=False,
                                    walls="back")
    np.testing.assert_array_equal(boxes, expected_boxes(ids))
    # Only floor and back wall: the top row (back wall) has no corner to a side wall, so its
    # colour changes smoothly (light falloff), without the jump of a wall edge.
    top = image[0].astype(int)
    assert np.abs(np.diff(top, axis=0)).max() <= 3
    shaded = render_room(np.random.default_rng(seed), image_size=64, max_objects=4, shadows=False)[0]
    assert np.abs(np.diff(shaded[0].astype(int), axis=0)).max() > 3, "the usual room shows a side wall"


def test_a_root_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(OSError, match=r"cannot make the dataset folder .*file/rooms: "):
        generate_rooms(tmp_path / "file" / "rooms", image_size=32, num_train=1, num_val=1, num_test=1, progress=False)
