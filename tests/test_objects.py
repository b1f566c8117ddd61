"""Objects as data: detect() boxes agree with the evaluation; export round-trips."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from space.config import ModelConfig
from space.evaluation import evaluate
from space.metrics import DetectionAccumulator
from space.model import Space
from space.objects import export_detections

from conftest import ROOT

CFG = ModelConfig(image_size=32, G=4, glimpse_size=16, fg_width=0.25, bg_width=0.25, K=2)


class BoxedImages(torch.utils.data.Dataset):
    """Random images with ground-truth boxes in the normalised [y_min, y_max, x_min, x_max] convention."""
    has_boxes = True

    def __init__(self, images, boxes):
        self.images, self._boxes = images, boxes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]

    def boxes(self, i):
        return self._boxes[i]


def test_detect_boxes_give_the_evaluation_ap(tmp_path):
    model = Space(CFG).eval()
    images = torch.rand(10, 3, 32, 32)
    detections = model.detect(images)
    assert sum(len(d) for d in detections) > 0
    # ground truth: some of the model's own boxes, shifted a little, so that AP is neither 0 nor 1
    rng = np.random.default_rng(0)
    gt = []
    for objects in detections:
        chosen = [d for d in objects if rng.random() < 0.5]
        gt.append(np.array([[(d.y_min + s) / 32, (d.y_max + s) / 32, (d.x_min - s) / 32, (d.x_max - s) / 32]
                             for d in chosen for s in [rng.uniform(0, 3)]], dtype=np.float32).reshape(-1, 4))
    dataset = BoxedImages(images, gt)
    metrics = evaluate(model, dataset, batch_size=4, progress=False)
    accumulator = DetectionAccumulator()
    for objects, boxes in zip(detections, gt):
        pred = np.array([[d.y_min / 32, d.y_max / 32, d.x_min / 32, d.x_max / 32] for d in objects],
                        dtype=np.float32).reshape(-1, 4)
        accumulator.add(pred, np.array([d.presence for d in objects], dtype=np.float32), boxes)
    ours = accumulator.compute()
    assert 0 < metrics["ap_50"] < 1
    assert ours["aps"] == pytest.approx(metrics["aps"], abs=1e-6)
    assert ours["perfect"] == metrics["perfect"]


def test_detect_maps_boxes_to_the_input_size_and_sorts_by_presence():
    model = Space(CFG).eval()
    image = (np.random.default_rng(0).random((48, 96, 3)) * 255).astype(np.uint8)  # H 48, W 96
    resized = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
                                              size=(32, 32), mode="bilinear", align_corners=False,
                                              antialias=True)  # detect's own resize
    big, small = model.detect([image])[0], model.detect(resized)[0]
    assert len(big) == len(small) > 0
    for a, b in zip(big, small):
        assert a.x_min == pytest.approx(b.x_min * 3, rel=1e-4) and a.y_max == pytest.approx(b.y_max * 1.5, rel=1e-4)
        assert len(a.z_what) == CFG.z_what_dim and a.presence > 0.5
    assert [d.presence for d in big] == sorted((d.presence for d in big), reverse=True)


def test_detect_takes_each_form_of_an_image_alike_and_refuses_values_it_would_misread():
    from PIL import Image

    torch.manual_seed(0)
    model = Space(CFG).eval()
    rgb = (np.random.default_rng(1).random((48, 40, 3)) * 255).astype(np.uint8)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)

    def boxes(images):
        (found,) = model.detect(images)
        return np.array([d.box for d in found])

    expected = boxes([rgb])
    assert len(expected)
    # images of other sizes in one list, as torchvision.io.read_image gives them (3, H, W)
    small = torch.from_numpy(rgb[:24, :30].copy()).permute(2, 0, 1)
    both = model.detect([chw, small])
    np.testing.assert_allclose(np.array([d.box for d in both[0]]), expected, atol=1e-4)
    np.testing.assert_allclose(np.array([d.box for d in both[1]]), boxes([rgb[:24, :30]]), atol=1e-4)
    for same in (rgb, Image.fromarray(rgb), [Image.fromarray(rgb)], chw, chw[None], chw.float() / 255, [chw],
                 [torch.from_numpy(rgb)], [(torch.from_numpy(rgb) / 255).requires_grad_()],
                 rgb.astype(np.float32) / 255, np.dstack([rgb, np.full((48, 40), 7, np.uint8)])):
        np.testing.assert_allclose(boxes(same), expected, atol=1e-4)
    assert len(model.detect([(torch.from_numpy(rgb) / 255).bfloat16()])) == 1  # read as an array, in float32
    grey = rgb[:, :, 0]
    np.testing.assert_allclose(boxes(grey), boxes(np.dstack([grey] * 3)), atol=1e-4)
    np.testing.assert_allclose(boxes(Image.fromarray(grey)), boxes(np.dstack([grey] * 3)), atol=1e-4)
    # the same image in 16 bits, as an array and a tensor; its grey in 16 bits and in floats, as PIL images
    deep = rgb.astype(np.uint16) * 257
    np.testing.assert_allclose(boxes(deep), expected, atol=1e-4)
    np.testing.assert_allclose(boxes(torch.from_numpy(deep).permute(2, 0, 1)), expected, atol=1e-4)
    for deep_grey in (Image.fromarray(deep[:, :, 0]), Image.fromarray(grey.astype(np.float32) / 255)):
        np.testing.assert_allclose(boxes(deep_grey), boxes(grey), atol=1e-4)
    refused = {  # values a silent guess would misread, and shapes that are not an RGB image
        "float values must lie in [0, 1], got 0..254": [rgb.astype(np.float64)],
        "float values must lie in [0, 1]": chw.float(),
        "image 0: float values must be finite and lie in [0, 1], got 1 NaN or infinite value(s)":
            [np.where(np.arange(rgb.size).reshape(rgb.shape) == 5, np.nan, rgb / 255.0)],
        "the image tensor: float values must be finite and lie in [0, 1], got 2 NaN or infinite value(s)":
            torch.where(torch.arange(chw.numel()).view(chw.shape) < 2, torch.nan, chw / 255.0),
        "expected uint8 values (0..255), uint16 ones (0..65535) or float ones in [0, 1], got torch.int64":
            [rgb.astype(np.int64)],
        "image 0 holds 32-bit float values 0..254, outside [0, 1]": Image.fromarray(grey.astype(np.float32)),
        "a channels-first (3, H, W) image goes in as a torch tensor": [chw.numpy()],
        "expected a (B, 3, H, W) or (3, H, W) image tensor, got shape (2, 1, 48, 40)": torch.rand(2, 1, 48, 40),
        "no images given": [],
        "no images given (a tensor of shape (0, 3, 48, 40))": chw[None][:0],
        "got the path 'photo.jpg': pass the image itself, e.g. PIL.Image.open(path)": "photo.jpg",
        "image 0: got the path 'photo.jpg'": ["photo.jpg"],
        "image 0: expected a (3, H, W) image tensor, got shape (3, 0, 40)": [chw[:, :0]],
        "image 0: expected an RGB image (H, W, 3), got an array of shape (0, 40, 3)": [rgb[:0]],
    }
    for message, images in refused.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            model.detect(images)


def test_export_writes_a_table_and_json_that_read_back(tmp_path):
    model = Space(CFG).eval()
    images = torch.rand(5, 3, 32, 32)
    summary = export_detections(model, BoxedImages(images, [np.zeros((0, 4))] * 5), tmp_path / "objects",
                                batch_size=2, progress=False)
    table = pd.read_parquet(tmp_path / "objects.parquet")
    document = json.loads((tmp_path / "objects.json").read_text())
    detections = model.detect(images)
    assert summary["num_objects"] == len(table) == sum(len(d) for d in detections)
    assert list(table.columns[:9]) == ["image", "object", "x_min", "y_min", "x_max", "y_max", "presence", "depth",
                                       "cell"]
    first = table[table.image == 0].iloc[0]
    assert first.x_min == pytest.approx(detections[0][0].x_min, abs=1e-5)
    assert first.z_what_31 == pytest.approx(detections[0][0].z_what[31], abs=1e-5)
    assert len(document["images"]) == 5 and "pixels" in document["convention"]
    assert document["images"][0]["objects"][0]["presence"] == pytest.approx(first.presence)


def test_detect_turns_a_photo_as_its_exif_orientation_says(tmp_path):
    """As the datasets do: a phone photo stored on its side, with orientation 6, is seen and boxed
    as viewers show it, like the same pixels saved turned."""
    from PIL import Image, ImageOps
    model = Space(CFG).eval()
    rng = np.random.default_rng(1)
    stored = Image.fromarray((rng.random((40, 80, 3)) * 255).astype(np.uint8))  # 80 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to show
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "photo.jpg") as photo:
        turned = ImageOps.exif_transpose(photo)  # PIL's own, which also drops the orientation it applied
        assert turned.size == (40, 80)
        expected = model.detect(turned, threshold=0.0)
        got = model.detect(photo, threshold=0.0)
    assert [d.box for d in got[0]] == [d.box for d in expected[0]]
    assert max(d.x_max for d in got[0]) < 60 < max(d.y_max for d in got[0])  # 40 wide, 80 high


def test_an_export_without_objects_keeps_the_column_types_and_says_what_it_covers(tmp_path, caplog):
    model = Space(CFG).eval()
    images = BoxedImages(torch.rand(3, 3, 32, 32), [np.zeros((0, 4))] * 3)
    full = export_detections(model, images, tmp_path / "all", threshold=0.0, progress=False, split="val")
    assert full["num_objects"] == 3 * CFG.G ** 2  # threshold 0: every cell
    with caplog.at_level("WARNING", logger="space.objects"):
        empty = export_detections(model, images, tmp_path / "none", threshold=0.999999, num_images=5,
                                  progress=False, split="val")
    assert empty["num_objects"] == 0 and empty["num_images"] == 3
    assert "num_images = 5, but the val split has 3 images" in caplog.text
    types = pd.read_parquet(tmp_path / "all.parquet").dtypes
    assert (pd.read_parquet(tmp_path / "none.parquet").dtypes == types).all()
    assert types["image"] == "int64" and types["x_min"] == "float64"
    document = json.loads((tmp_path / "none.json").read_text())
    assert (document["split"], document["num_images"], len(document["images"])) == ("val", 3, 3)
    with pytest.raises(ValueError, match="num_images: a number of images >= 1 or None"):
        export_detections(model, images, tmp_path / "x", num_images=-2, progress=False)
    assert export_detections(model, images, tmp_path / "x", num_images=np.int64(2), progress=False)["num_images"] == 2


def test_detect_refuses_a_bad_threshold_and_a_model_that_computes_nan():
    model = Space(CFG).eval()
    for threshold in (None, 1.0, -0.1, True, "0.5"[:0]):
        with pytest.raises(ValueError, match=r"threshold: a presence probability in \[0, 1\)"):
            model.detect(torch.rand(1, 3, 32, 32), threshold=threshold)
    x = torch.rand(1, 3, 32, 32)
    for threshold in (np.float32(0.5), torch.tensor(0.5), np.float64(0.5)):  # numbers of other kinds
        assert model.detect(x, threshold=threshold) == model.detect(x, threshold=0.5)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"the model computes NaN or infinite latents for image\(s\) \[0, 1\]"):
        model.detect(torch.rand(2, 3, 32, 32))


def test_detect_on_pil_images_warns_of_nothing():
    # np.asarray of a PIL image is read-only, and torch.from_numpy on it warned "The given NumPy
    # array is not writable" (once per process, so the check runs in a fresh one)
    code = ("import warnings, numpy as np, torch; from PIL import Image; from space.config import ModelConfig; "
            "from space.model import Space; warnings.simplefilter('error'); torch.manual_seed(0); "
            f"m = Space(ModelConfig(**{dataclasses.asdict(CFG)!r})).eval(); "
            "print(len(m.detect([Image.new('RGB', (40, 30), (200, 30, 30))])))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr[-2000:]


def test_export_gives_each_objects_file_and_its_box_in_the_files_pixels(tmp_path):
    from PIL import Image
    from space.data.datasets import AtariDataset, FolderDataset
    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide.png": (96, 48), "tall.jpg": (40, 80)}.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / name)
    dataset = FolderDataset(folder, "all", image_size=32)
    # shorter side scaled to 32, then the centre square: the model's whole image is the file's centre square
    assert [(Path(dataset.source(i).path).name, dataset.source(i).box(0, 0, 32, 32)) for i in range(2)] == [
        ("tall.jpg", (0.0, 20.0, 40.0, 60.0)), ("wide.png", (24.0, 0.0, 72.0, 48.0))]
    model = Space(CFG).eval()
    export_detections(model, dataset, tmp_path / "objects", batch_size=2, progress=False)
    table = pd.read_parquet(tmp_path / "objects.parquet")
    document = json.loads((tmp_path / "objects.json").read_text())
    assert len(table) > 0 and list(table.columns[:3]) == ["image", "file", "object"]
    for row in table.itertuples():
        assert row.file == dataset.source(row.image).path
        assert (row.file_x_min, row.file_y_min, row.file_x_max, row.file_y_max) == pytest.approx(
            dataset.source(row.image).box(row.x_min, row.y_min, row.x_max, row.y_max))
    assert [image["file"] for image in document["images"]] == [str(folder / "tall.jpg"), str(folder / "wide.png")]
    first = document["images"][int(table.image[0])]["objects"][0]
    assert first["file_box"] == pytest.approx([table.file_x_min[0], table.file_y_min[0], table.file_x_max[0],
                                               table.file_y_max[0]])
    # Atari frames are resized to the square without a crop
    game = tmp_path / "atari" / "Pong-v0" / "test"
    game.mkdir(parents=True)
    Image.new("RGB", (160, 210)).save(game / "0.png")
    assert AtariDataset(tmp_path / "atari", "test", image_size=128).source(0).box(0, 0, 128, 128) == (0, 0, 160, 210)


def test_detect_shrinks_a_large_image_as_pil_does_not_by_sampling_it():
    # A fine texture must reach the model averaged out, as PIL's resize (the datasets') leaves it;
    # bilinear sampling without antialiasing kept it at full contrast (std 0.194 against 0.021).
    from PIL import Image

    from space.objects import _as_batch

    big = (np.random.default_rng(0).random((600, 600, 3)) * 255).astype(np.uint8)
    pil = torch.from_numpy(np.array(Image.fromarray(big).resize((64, 64), Image.Resampling.BILINEAR))) / 255
    for image in (big, torch.from_numpy(big).permute(2, 0, 1)):
        x, _ = _as_batch(image, 64)
        assert float((x[0].permute(1, 2, 0) - pil).abs().mean()) < 0.003
