"""Tests of the datasets (space/data/datasets.py) on small fixtures made here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from space.data.datasets import AtariDataset, FolderDataset, Obj3dDataset, read_box_file


def save(path: Path, array: np.ndarray, mode: str | None = None, **params) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path, **params)
    return array


def noise(rng: np.random.Generator, h: int, w: int, c: int = 3) -> np.ndarray:
    shape = (h, w, c) if c > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


# --- OBJ3D ------------------------------------------------------------------------------------


@pytest.fixture
def obj3d(tmp_path: Path) -> Path:
    """OBJ3D layout: 12 val images (index order differs from string order), boxes, distractors."""
    rng = np.random.default_rng(0)
    root = tmp_path / "OBJ3D_SMALL"
    for split, n in (("train", 3), ("val", 12), ("test", 2)):
        for i in range(n):
            ext = "jpg" if (split, i) == ("val", 5) else "png"
            save(root / split / f"{i}-obj.{ext}", noise(rng, 128, 128))
            bb = root / split / "bb" / f"bb_{i}.txt"
            bb.parent.mkdir(exist_ok=True)
            bb.write_text(f"{10 + i},20,8,4\n\n30.5,40.5,3,5\n" if i != 2 else "")
    (root / "val" / "notes.png.txt").write_text("not an image despite 'png' in the name")
    (root / "val" / "._0-obj.png").write_bytes(b"macOS resource fork")
    return root


def test_obj3d_order_values_and_boxes(obj3d: Path) -> None:
    dataset = Obj3dDataset(obj3d, "val")
    assert len(dataset) == 12 and dataset.has_boxes
    assert [p.name for p in dataset.paths][:3] == ["0-obj.png", "1-obj.png", "2-obj.png"]
    assert dataset.paths[10].name == "10-obj.png"
    image = dataset[11]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    expected = np.asarray(Image.open(obj3d / "val" / "11-obj.png")).transpose(2, 0, 1) / np.float32(255)
    np.testing.assert_array_equal(image.numpy(), expected)
    assert 0.0 <= float(dataset[5].min()) and float(dataset[5].max()) <= 1.0  # the jpg
    boxes = dataset.boxes(1)
    assert boxes.dtype == np.float64  # as the original evaluator reads them (SPEC 9.3)
    np.testing.assert_allclose(boxes, np.array([[18, 22, 7, 15], [38, 43, 29, 32]]) / 128)
    assert dataset.boxes(2).shape == (0, 4)  # empty file: no objects
    # float64 reproduces the original evaluator's read_boxes exactly.
    assert dataset.boxes(1)[1, 0] == (40.5 - 5 / 2.0) / 128
    assert dataset.boxes(1, dtype=np.float32).dtype == np.float32


def test_obj3d_resize_and_non_square_crop(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "rooms"
    wide = save(root / "test" / "0-a.png", noise(rng, 64, 80))
    dataset = Obj3dDataset(root, "test", image_size=64, with_boxes=False)
    np.testing.assert_array_equal(dataset[0].numpy(), wide[:, 8:72].transpose(2, 0, 1) / np.float32(255))
    small = Obj3dDataset(root, "test", image_size=32, with_boxes=False)[0]
    assert small.shape == (3, 32, 32)
    resized = Image.fromarray(wide).resize((40, 32), Image.Resampling.BILINEAR).crop((4, 0, 36, 32))
    np.testing.assert_array_equal(small.numpy(), np.asarray(resized).transpose(2, 0, 1) / np.float32(255))


def test_obj3d_rgba_and_gray_are_converted(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "rooms"
    rgba = save(root / "val" / "0-a.png", noise(rng, 16, 16, 4))
    gray = save(root / "val" / "1-a.png", noise(rng, 16, 16, 1))
    dataset = Obj3dDataset(root, "val", image_size=16, with_boxes=False)
    np.testing.assert_array_equal(dataset[0].numpy(), rgba[..., :3].transpose(2, 0, 1) / np.float32(255))
    assert torch.equal(dataset[1][0], dataset[1][2])
    assert torch.allclose(dataset[1][0], torch.from_numpy(gray / 255).float())


def test_obj3d_box_pixel_size_from_meta(obj3d: Path) -> None:
    (obj3d / "meta.json").write_text(json.dumps({"image_size": 64}))
    assert Obj3dDataset(obj3d, "val").box_pixel_size == 64
    np.testing.assert_allclose(Obj3dDataset(obj3d, "val").boxes(0)[0], np.array([18, 22, 6, 14]) / 64)
    assert Obj3dDataset(obj3d, "val", box_pixel_size=128).box_pixel_size == 128


def test_obj3d_missing_root_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        Obj3dDataset(tmp_path / "OBJ3D_SMALL", "val")
    message = str(error.value)
    assert "OBJ3D_SMALL" in message and "dvc repro" in message
    assert "https://drive.google.com/open?id=18Ta1sWCyprv0QPGMUOMMPFWac8KFICMN" in message
    assert f"put it at {Path('data', 'archives', 'OBJ3D_SMALL.tar.gz')}" in message  # where the data stage looks
    assert "python -m space.fetch OBJ3D_SMALL" in message
    with pytest.raises(FileNotFoundError, match="generate_rooms"):
        Obj3dDataset(tmp_path / "ROOMS", "val")


def test_obj3d_split_errors(obj3d: Path) -> None:
    with pytest.raises(ValueError, match="Unknown split"):
        Obj3dDataset(obj3d, "validation")
    for p in (obj3d / "test").glob("*.png"):
        p.unlink()
    with pytest.raises(ValueError, match=r"No images .* in .*test"):
        Obj3dDataset(obj3d, "test")


def test_obj3d_corrupt_and_truncated_images(obj3d: Path) -> None:
    (obj3d / "val" / "3-obj.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = (obj3d / "val" / "4-obj.png").read_bytes()
    (obj3d / "val" / "4-obj.png").write_bytes(data[: len(data) // 2])
    dataset = Obj3dDataset(obj3d, "val")
    for i in (3, 4):
        with pytest.raises(ValueError, match=rf"{i}-obj\.png.*corrupt or truncated"):
            dataset[i]


def test_obj3d_box_file_errors(obj3d: Path) -> None:
    (obj3d / "val" / "bb" / "bb_7.txt").write_text("1,2,3,4\n1,2,3\n")
    with pytest.raises(ValueError, match=r"bb_7\.txt, line 2"):
        Obj3dDataset(obj3d, "val").boxes(7)
    (obj3d / "val" / "bb" / "bb_7.txt").write_text("1,2,3,four\n")
    with pytest.raises(ValueError, match=r"bb_7\.txt, line 1.*'1,2,3,four'"):
        Obj3dDataset(obj3d, "val").boxes(7)
    for line in ("1,2,-3,4", "1,2,3,-4", "nan,2,3,4", "1,inf,3,4"):  # float() parses nan and inf
        (obj3d / "val" / "bb" / "bb_7.txt").write_text(f"1,2,3,4\n\n{line}\n")
        with pytest.raises(ValueError, match=rf"bb_7\.txt, line 3: expected finite numbers with width and height >= 0, "
                                             rf"got '{line}'"):
            Obj3dDataset(obj3d, "val").boxes(7)
    (obj3d / "val" / "bb" / "bb_9.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"bb_9\.txt is missing"):
        Obj3dDataset(obj3d, "val")
    images_only = Obj3dDataset(obj3d, "val", with_boxes=False)
    assert not images_only.has_boxes and len(images_only) == 12
    with pytest.raises(ValueError, match="with_boxes=False"):
        images_only.boxes(0)


def test_obj3d_missing_box_folder_and_bad_names(obj3d: Path) -> None:
    for p in (obj3d / "train" / "bb").iterdir():
        p.unlink()
    (obj3d / "train" / "bb").rmdir()
    with pytest.raises(FileNotFoundError, match=r"train.bb does not exist.*with_boxes=False"):
        Obj3dDataset(obj3d, "train")
    save(obj3d / "train" / "room.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"room\.png does not start with '<index>-'"):
        Obj3dDataset(obj3d, "train", with_boxes=False)


def test_obj3d_images_with_a_gap_in_their_indices_are_refused_where_boxes_are_read(obj3d: Path) -> None:
    """Box file i belongs to the i-th image in index order (SPEC 10.1): with image 4 gone, image 5
    took bb_4.txt without a word. Images alone still load."""
    (obj3d / "val" / "4-obj.png").unlink()
    with pytest.raises(ValueError, match=r"val has no image of index 4 \(1 of indices 0-11 missing\): the i-th image in "
                                         r"index order takes box file bb_i.txt"):
        Obj3dDataset(obj3d, "val")
    assert len(Obj3dDataset(obj3d, "val", with_boxes=False)) == 11
    # Indices that do not start at 0 pair by position, as the original's do; only gaps are refused.
    for i in (1, 0):
        (obj3d / "test" / f"{i}-obj.png").rename(obj3d / "test" / f"{100 + i}-obj.png")
    assert len(Obj3dDataset(obj3d, "test")) == 2
    (obj3d / "test" / "101-obj.png").rename(obj3d / "test" / "102-obj.png")
    with pytest.raises(ValueError, match=r"test has no image of index 101 \(1 of indices 100-102 missing\)"):
        Obj3dDataset(obj3d, "test")


def test_read_box_file_matches_original_formula(tmp_path: Path) -> None:
    path = tmp_path / "bb_0.txt"
    path.write_text("64.5,30,21,17\n")
    y_min, y_max, x_min, x_max = read_box_file(path, 128)[0]
    assert (y_min, y_max, x_min, x_max) == ((30 - 17 / 2.0) / 128, (30 + 17 / 2.0) / 128,
                                            (64.5 - 21 / 2.0) / 128, (64.5 + 21 / 2.0) / 128)


# --- Atari ------------------------------------------------------------------------------------


@pytest.fixture
def atari(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    root = tmp_path / "ATARI"
    for game in ("Pong-v0", "Breakout-v0"):
        for split in ("train", "validation", "test"):
            for name in ("0", "1", "2", "10"):
                save(root / game / split / f"{name}.png", noise(rng, 210, 160))
            (root / game / split / "Thumbs.db").write_bytes(b"stray")
    return root


def test_atari_order_split_and_values(atari: Path) -> None:
    dataset = AtariDataset(atari, "val")
    assert not dataset.has_boxes and len(dataset) == 8
    assert dataset.relative_paths[:5] == [
        "Breakout-v0/validation/0.png", "Breakout-v0/validation/1.png", "Breakout-v0/validation/10.png",
        "Breakout-v0/validation/2.png", "Pong-v0/validation/0.png",
    ]
    resized = Image.open(atari / "Pong-v0" / "validation" / "10.png").resize((128, 128), Image.Resampling.BILINEAR)
    expected = torch.from_numpy(np.asarray(resized) / 255).permute(2, 0, 1).float()
    image = dataset[6]
    assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
    assert torch.equal(image, expected)
    bgr = AtariDataset(atari, "val", bgr=True)[6]
    assert torch.equal(bgr, expected.flip(0))
    assert AtariDataset(atari, "test", image_size=64)[0].shape == (3, 64, 64)


def test_atari_game_selection(atari: Path) -> None:
    pong = AtariDataset(atari, "train", games=["Pong"])
    assert len(pong) == 4 and all(p.startswith("Pong-v0/train/") for p in pong.relative_paths)
    assert AtariDataset(atari, "train", games=["Pong-v0"]).relative_paths == pong.relative_paths
    available = r"available: \['Breakout-v0', 'Pong-v0'\]"
    with pytest.raises(FileNotFoundError, match=rf"SpaceInvaders-v0 does not exist .*{available}"):
        AtariDataset(atari, "train", games=["SpaceInvaders"])
    with pytest.raises(FileNotFoundError, match=r"Game folders \S+Atlantis-v0, \S+Qbert-v0 do not exist"):
        AtariDataset(atari, "train", games=["Atlantis", "Pong", "Qbert"])  # every missing one named
    with pytest.raises(TypeError):
        AtariDataset(atari, "train", games="Pong")


def test_atari_errors(atari: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ATARI does not exist.*dvc repro.*1vzFVFhJZDZMkJ8liROtIyzOiUY42r4TZ"):
        AtariDataset(tmp_path / "missing" / "ATARI", "train")
    for p in (atari / "Pong-v0" / "test").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=r"No images .*Pong-v0.test"):
        AtariDataset(atari, "test")
    (atari / "Pong-v0" / "test").rmdir()
    with pytest.raises(FileNotFoundError, match=r"Pong-v0.test does not exist"):
        AtariDataset(atari, "test")
    (atari / "Breakout-v0" / "train" / "1.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"Breakout-v0.train.1\.png"):
        AtariDataset(atari, "train")[1]


# --- Plain folder -----------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(4)
    root = tmp_path / "mine"
    save(root / "wide.png", noise(rng, 100, 200))
    save(root / "rgba.png", noise(rng, 64, 64, 4))
    save(root / "gray.jpg", noise(rng, 80, 50, 1))
    save(root / "palette.gif", noise(rng, 40, 40), mode="P")
    save(root / "cmyk.jpg", noise(rng, 30, 30), mode="CMYK")
    for i in range(5):
        save(root / f"img{i}.bmp", noise(rng, 20 + i, 30))
    (root / "readme.txt").write_text("not an image")
    return root


def test_folder_mixed_images_and_splits(folder: Path) -> None:
    splits = {s: FolderDataset(folder, s, image_size=32, seed=3) for s in ("train", "val", "test")}
    assert [len(d) for d in splits.values()] == [8, 1, 1]
    names = [p.name for d in splits.values() for p in d.paths]
    assert sorted(names) == sorted(p.name for p in FolderDataset(folder, "all").paths) and len(set(names)) == 10
    for dataset in splits.values():
        for i in range(len(dataset)):
            image = dataset[i]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert FolderDataset(folder, "train", seed=3).paths == splits["train"].paths
    assert FolderDataset(folder, "train", seed=4).paths != splits["train"].paths
    gray = FolderDataset(folder, "all", image_size=32)
    g = gray[[p.name for p in gray.paths].index("gray.jpg")]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    assert not gray.has_boxes


def test_folder_boxes_follow_resize_and_crop(folder: Path) -> None:
    paths = FolderDataset(folder, "all").paths
    (folder / "bb").mkdir()
    for p in paths:
        (folder / "bb" / f"{p.stem}.txt").write_text("")
    # wide.png is 200 x 100: scaled by 0.25 to 50 x 25 for image_size 25, then 12 px cropped on the left.
    (folder / "bb" / "wide.txt").write_text("100,50,40,20\n10,10,8,8\n150,50,64,20\n")
    dataset = FolderDataset(folder, "all", image_size=25)
    assert dataset.has_boxes
    boxes = dataset.boxes([p.name for p in dataset.paths].index("wide.png"))
    expected = np.array([
        [(12.5 - 2.5) / 25, (12.5 + 2.5) / 25, (25 - 5 - 12) / 25, (25 + 5 - 12) / 25],
        [(12.5 - 2.5) / 25, (12.5 + 2.5) / 25, (29.5 - 12) / 25, 1.0],  # clipped at the right edge
    ])  # the box at x = 10 lies in the cropped-off strip and is dropped
    np.testing.assert_allclose(boxes, expected, rtol=1e-6)
    (folder / "bb" / "rgba.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"bb.rgba\.txt is missing for image .*rgba\.png"):
        FolderDataset(folder, "all")
    (folder / "bb" / "rgba.txt").write_text("")
    save(folder / "wide.jpg", noise(np.random.default_rng(0), 10, 10))  # bb/wide.txt would serve both
    with pytest.raises(ValueError, match=r"Images wide\.jpg and wide\.png of .* would share the box file .*wide\.txt;"):
        FolderDataset(folder, "train")
    shutil.rmtree(folder / "bb")  # without box files, names may repeat
    assert len(FolderDataset(folder, "all")) == 11


def test_folder_errors(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderDataset(tmp_path / "nope", "train")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"No image files in .*empty"):
        FolderDataset(tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="split_fractions"):
        FolderDataset(folder, "train", split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"Split 'val' .* is empty"):
        FolderDataset(folder, "val", split_fractions=(0.95, 0.0, 0.05))
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    dataset = FolderDataset(folder, "all")
    with pytest.raises(ValueError, match=r"broken\.png.*corrupt or truncated"):
        dataset[[p.name for p in dataset.paths].index("broken.png")]


def test_an_image_over_pils_pixel_limit_is_not_called_corrupt(folder: Path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # wide.png has 20000 pixels, over twice the limit
    dataset = FolderDataset(folder, "all")
    with pytest.raises(ValueError, match=r"wide\.png: Image size \(20000 pixels\) exceeds .* The file may be sound, "
                                         r"but PIL refuses images this large; save a smaller copy"):
        dataset[[p.name for p in dataset.paths].index("wide.png")]


def test_folder_reads_16_bit_and_float_images_at_their_own_depth(tmp_path: Path) -> None:
    # PIL's convert('RGB') clips 16-bit values to 255 (a 16-bit grey PNG came out nearly white)
    # and truncates floats (an image in [0, 1] came out black).
    from space.data.datasets import check_image

    grey = np.random.default_rng(5).integers(0, 256, (24, 24)).astype(np.uint8)
    root = tmp_path / "deep"
    root.mkdir()
    Image.fromarray(grey).save(root / "a8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "b16.png")  # 257 * v: the same grey in 16 bits
    Image.fromarray(grey.astype(np.float32) / 255).save(root / "c_float.tif")
    Image.fromarray(grey.astype(np.int32) * 257).save(root / "d32.tif")
    dataset = FolderDataset(root, "all", image_size=24)
    modes = []
    for path in dataset.paths:
        with Image.open(path) as image:
            modes.append(image.mode)
    assert modes == ["L", "I;16", "F", "I"]
    for i in range(1, 4):
        assert torch.equal(dataset[i], dataset[0]), dataset.paths[i].name
    assert abs(float(dataset[0].mean()) - grey.mean() / 255) < 1e-6
    Image.fromarray(grey.astype(np.float32)).save(root / "e_float.tif")  # 0..255 in a float image
    Image.fromarray(grey.astype(np.int32) * 1000).save(root / "f32.tif")
    dataset = FolderDataset(root, "all", image_size=24)
    for index, message in ((4, r"e_float\.tif holds 32-bit float values 0\.\.255, outside \[0, 1\]"),
                           (5, r"f32\.tif holds integer values 0\.\.255000, outside 0\.\.65535")):
        with pytest.raises(ValueError, match=message):
            dataset[index]
        with pytest.raises(ValueError, match=message):
            check_image(dataset.paths[index], 24)


def test_folder_turns_images_as_their_exif_orientation_says(tmp_path: Path) -> None:
    # A phone stores the sensor's pixels and an EXIF orientation; viewers turn the image, and box
    # files measured in one are in the turned image. Before, the stored pixels were read unturned.
    stored = np.random.default_rng(6).integers(0, 256, (20, 30, 3)).astype(np.uint8)  # 30 wide, 20 high
    shown = np.rot90(stored, k=-1)  # orientation 6: turned a quarter clockwise for display, 20 wide, 30 high
    root = tmp_path / "phone"
    (root / "bb").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(root / "a_phone.png", exif=exif)
    Image.fromarray(np.ascontiguousarray(shown)).save(root / "b_plain.png")
    # PIL writes eXIf before the pixel data; PNG allows it after them too, where PIL finds it only on decoding
    png = (root / "a_phone.png").read_bytes()
    start = png.index(b"eXIf") - 4
    end = start + 12 + int.from_bytes(png[start:start + 4], "big")
    png = png[:start] + png[end:]
    (root / "c_late.png").write_bytes(png[:png.index(b"IEND") - 4] + (root / "a_phone.png").read_bytes()[start:end]
                                      + png[png.index(b"IEND") - 4:])
    with Image.open(root / "c_late.png") as late:
        assert "exif" not in late.info and late.getexif()[0x0112] == 6  # there, and only found by decoding
    for name in ("a_phone", "b_plain", "c_late"):
        (root / "bb" / f"{name}.txt").write_text("5,20,4,6\n")  # pixels of the image as shown
    dataset = FolderDataset(root, "all", image_size=20)
    for turned in (0, 2):
        assert torch.equal(dataset[turned], dataset[1])
        np.testing.assert_array_equal(dataset.boxes(turned), dataset.boxes(1))
        assert dataset.source(turned).box(1, 2, 3, 4) == dataset.source(1).box(1, 2, 3, 4)


def test_folder_decodes_a_large_jpeg_at_a_reduced_scale_with_the_full_decodes_geometry(tmp_path: Path) -> None:
    from space.data.datasets import _resize_shorter_and_crop, load_image

    def tensor(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255

    def centre(image: torch.Tensor) -> torch.Tensor:  # (row, column) centre of the white block
        return torch.nonzero(image[0] > 0.7).float().mean(0)

    # 1001 x 733 decodes at 1/8 as 126 x 92, whose aspect differs from the file's, its last column
    # and row reaching past the file's edge; a white block on grey must land where a full decode puts it,
    # also when the photo is stored turned (EXIF orientation 6 and 3)
    pixels = np.full((733, 1001, 3), 90, np.uint8)
    pixels[300:460, 480:640] = 250
    (tmp_path / "big").mkdir()
    Image.fromarray(pixels).save(tmp_path / "big" / "photo.jpg", quality=95)
    for orientation in (6, 3):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(tmp_path / "big" / f"turned{orientation}.jpg", quality=95, exif=exif)
    dataset = FolderDataset(tmp_path / "big", "all", image_size=64)
    with Image.open(dataset.paths[0]) as image:
        image.draft("RGB", (64, 64))
        assert image.size == (126, 92)  # the reduced scale is taken
    for index in range(3):
        fast = dataset[index]
        full = tensor(_resize_shorter_and_crop(load_image(dataset.paths[index]), 64))
        assert fast.shape == full.shape == (3, 64, 64)
        assert float((fast - full).abs().mean()) < 0.01, dataset.paths[index].name
        torch.testing.assert_close(centre(fast), centre(full), atol=0.1, rtol=0)


def test_folder_images_in_each_orientation_equal_a_full_load_turned_resized_and_cropped(tmp_path: Path) -> None:
    # the fast loader resizes in the stored orientation and turns afterwards; for lossless files
    # that must give the pixels of turning first (to one level in 255 for quarter turns: PIL resizes
    # in two passes, rounding to 8 bits between them, and a quarter turn swaps their order); PIL's
    # own exif_transpose turns the reference, and load_image must turn as it does
    from PIL import ImageOps

    from space.data.datasets import _resize_shorter_and_crop, load_image

    pixels = np.random.default_rng(7).integers(0, 256, (23, 37, 3)).astype(np.uint8)
    (tmp_path / "turns").mkdir()
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(tmp_path / "turns" / f"o{orientation}.png", exif=exif)
    dataset = FolderDataset(tmp_path / "turns", "all", image_size=16)
    for index, path in enumerate(dataset.paths):
        with Image.open(path) as image:
            turned = ImageOps.exif_transpose(image).convert("RGB")
        assert np.array_equal(np.array(load_image(path)), np.array(turned)), path.name
        full = torch.from_numpy(np.array(_resize_shorter_and_crop(turned, 16))).permute(2, 0, 1) / 255
        torch.testing.assert_close(dataset[index], full, atol=1 / 255 + 1e-6, rtol=0, msg=path.name)


def test_folder_refuses_what_pil_identifies_but_cannot_decode(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        save(root / f"img{i}.png", noise(np.random.default_rng(i), 20, 30))
    (root / "scan.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(300))
    dataset = FolderDataset(root, "all", image_size=16)
    assert [p.name for p in dataset.paths] == ["img0.png", "img1.png", "img2.png"]  # .h5 is no image here
    assert [p.name for p in dataset.skipped] == ["scan.h5"]
    (root / "img1.png").write_bytes((root / "scan.h5").read_bytes())  # an HDF5 file named .png
    for read in (dataset.source, dataset.__getitem__):
        with pytest.raises(ValueError, match=r"^Cannot read image [^:]*img1\.png: PIL identifies it as HDF5 but cannot "
                                             r"decode that format here; convert it to PNG or JPEG, or move it out of "
                                             r"the folder$"):
            read(1)


def test_folder_refuses_file_names_that_are_not_utf8(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("a.png", os.fsdecode(b"caf\xe9.png")):  # a name from an archive made on Windows
        save(root / name, noise(np.random.default_rng(0), 20, 30))
    with pytest.raises(ValueError, match=r"1 image file name\(s\) in .* are not UTF-8 \(e\.g\. 'caf\\udce9\.png'"):
        FolderDataset(root, "all")
