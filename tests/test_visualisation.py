"""Tests for space/visualisation.py: grid layout, both kinds of boxes, figures and TensorBoard."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import space
from space import visualisation as vis

SIZE, G, K = 64, 4, 3


@pytest.fixture(scope="module")
def out() -> space.SpaceOutput:
    """One deterministic forward pass of a tiny random model on 3 images."""
    torch.manual_seed(0)
    model = space.Space(space.ModelConfig(image_size=SIZE, G=G, K=K, fg_width=0.25, bg_width=0.25)).eval()
    with torch.no_grad():
        return model(torch.rand(3, 3, SIZE, SIZE), space.final_priors(model.cfg), "deterministic")


def one_box(out: space.SpaceOutput, pres: float = 1.0, cell: int = 5) -> space.SpaceOutput:
    """``out`` with a black foreground and a single present cell at z_where [0.25, 0.25, 0, 0]."""
    b, n = out.z_where.shape[:2]
    z_where = torch.tensor([0.25, 0.25, 0.0, 0.0]).repeat(b, n, 1)
    z_pres = torch.zeros(b, n, 1)
    z_pres[:, cell] = pres
    return dataclasses.replace(out, fg=torch.zeros_like(out.fg), z_where=z_where, z_pres=z_pres,
                               z_pres_prob=z_pres.clone())


def no_temp_files(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- make_grid

def test_make_grid_layout_like_torchvision():
    images = torch.zeros(7, 3, 4, 5)
    grid = vis.make_grid(images, nrow=3, padding=2, pad_value=1)
    assert grid.shape == (3, 3 * (4 + 2) + 2, 3 * (5 + 2) + 2)
    assert grid[:, :2].eq(1).all() and grid[:, :, :2].eq(1).all()  # outer padding
    assert grid[:, 2:6, 2:7].eq(0).all()  # first image
    assert grid[:, 14:18, 2:7].eq(0).all()  # seventh image: third row, first column
    assert grid[:, 14:18, 9:14].eq(1).all()  # empty slot stays padding


def test_make_grid_grey_to_three_channels():
    grid = vis.make_grid(torch.full((2, 1, 3, 3), 0.5), nrow=2)
    assert grid.shape == (3, 7, 12)
    assert grid[:, 2:5, 2:5].eq(0.5).all()


# ---------------------------------------------------------------------------- separations grid

def test_separations_grid_shape(out):
    panels = vis.panel_count(K)
    assert panels == 15
    grid = vis.separations_grid(out)
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * (SIZE + 2) + 2, panels * (SIZE + 2) + 2, 3)
    assert vis.separations_grid(out, max_images=1).shape[0] == SIZE + 4


def test_separations_panel_order(out):
    grid = vis.separations_tensor(out)  # (3, H', W'), unclamped

    def panel(row: int, col: int) -> torch.Tensor:
        y, x = 2 + row * (SIZE + 2), 2 + col * (SIZE + 2)
        return grid[:, y:y + SIZE, x:x + SIZE]

    torch.testing.assert_close(panel(1, 0), out.imgs[1])
    torch.testing.assert_close(panel(1, 1), out.y[1])
    torch.testing.assert_close(panel(1, 2), out.fg[1])
    torch.testing.assert_close(panel(1, 3), vis.box_overlay(out)[1])
    torch.testing.assert_close(panel(1, 4), out.bg[1])
    for k in range(K):
        torch.testing.assert_close(panel(1, 5 + k), out.comps[1, k] * out.masks[1, k])
        torch.testing.assert_close(panel(1, 5 + K + k), out.masks[1, k].expand(3, -1, -1))
        torch.testing.assert_close(panel(1, 5 + 2 * K + k), out.comps[1, k])
    torch.testing.assert_close(panel(1, 5 + 3 * K), out.alpha_map[1].expand(3, -1, -1))


# ---------------------------------------------------------------------------- boxes

def test_box_template_is_green_border():
    t = vis.box_template()
    assert t.shape == (3, 21, 21)
    assert t[0].eq(0).all() and t[2].eq(0).all()
    border = torch.ones(21, 21, dtype=torch.bool)
    border[2:19, 2:19] = False
    assert t[1][border].eq(1).all() and t[1][~border].eq(0).all()


def test_original_boxes_green_square_where_present(out):
    boxed = vis.box_overlay(one_box(out))  # (B, 3, H, W)
    assert boxed.shape == out.fg.shape
    assert boxed[:, 0].eq(0).all() and boxed[:, 2].eq(0).all()  # green only
    green = boxed[0, 1]
    lit = green > 0
    ys, xs = lit.nonzero(as_tuple=True)
    # the box [0.25, 0.25, 0, 0] covers pixels 24..39 (edges 24 and 40) of a 64 px image
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (24, 39, 24, 39)
    assert green[24, 24:40].gt(0.5).all() and green[39, 24:40].gt(0.5).all()
    assert green[24:40, 24].gt(0.5).all() and green[24:40, 39].gt(0.5).all()
    assert green[28:36, 28:36].eq(0).all()  # hollow


def test_original_boxes_track_soft_z_pres(out):
    full = vis.box_overlay(one_box(out, pres=1.0))[0, 1]
    dim = vis.box_overlay(one_box(out, pres=0.3))[0, 1]
    torch.testing.assert_close(dim, 0.3 * full)
    assert vis.box_overlay(one_box(out, pres=0.0)).eq(0).all()


def test_original_boxes_are_added_to_fg_and_clamped(out):
    o = one_box(out)
    o = dataclasses.replace(o, fg=torch.full_like(o.fg, 0.8))
    boxed = vis.box_overlay(o)
    assert boxed.max() <= 1.0
    assert boxed[0, 1, 24, 30] == 1.0 and boxed[0, 0, 24, 30] == pytest.approx(0.8)
    assert boxed[0, 1, 5, 5] == pytest.approx(0.8)


def test_predicted_boxes_px_thresholds_on_prob(out):
    o = one_box(out)
    o = dataclasses.replace(o, z_pres_prob=torch.where(torch.arange(G * G).view(1, -1, 1) == 7, 0.6, 0.4)
                            .expand(3, -1, -1).clone())
    boxes = vis.predicted_boxes_px(o)
    assert len(boxes) == 3 and all(b.shape == (1, 4) for b in boxes)
    torch.testing.assert_close(boxes[0][0], torch.tensor([24.0, 24.0, 40.0, 40.0]))


def test_draw_boxes_crisp_rectangle():
    images = torch.zeros(2, 3, 64, 64)
    boxes = [torch.tensor([[24.0, 24.0, 40.0, 40.0]]), torch.zeros(0, 4)]
    drawn = vis.draw_boxes(images, boxes, colour=(1.0, 0.0, 0.0))
    assert images.eq(0).all()  # input untouched
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[24, 24:40] = expected[39, 24:40] = expected[24:40, 24] = expected[24:40, 39] = True
    assert torch.equal(drawn[0, 0] > 0, expected)
    assert drawn[0, 1:].eq(0).all()
    assert drawn[1].eq(0).all()


def test_draw_boxes_of_a_given_width_draw_inwards():
    drawn = vis.draw_boxes(torch.zeros(1, 3, 64, 64), [torch.tensor([[24.0, 24.0, 40.0, 40.0]])], width=2)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[24:26, 24:40] = expected[38:40, 24:40] = expected[24:40, 24:26] = expected[24:40, 38:40] = True
    assert torch.equal(drawn[0, 1] > 0, expected)


def test_demo_figure_labels_each_row_as_asked(out, tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(vis, "_save_figure", lambda fig, path: figures.append(fig) or Path(path))
    vis.demo_figure(out, tmp_path / "demo.png", labels=["#15", "#3", "#0"])
    vis.demo_figure(out, tmp_path / "demo.png")
    rows = [[ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] for fig in figures]
    assert rows == [["#15", "#3", "#0"], ["#0", "#1", "#2"]]


def test_training_curves_of_an_empty_file_name_it(tmp_path):
    (tmp_path / "rooms.csv").write_text("")
    with pytest.raises(ValueError, match=r"rooms.csv is empty; the train stage writes it"):
        vis.training_curves(tmp_path / "rooms.csv", tmp_path / "curves.png")


def test_draw_boxes_clips_to_image():
    drawn = vis.draw_boxes(torch.zeros(1, 3, 10, 10), [torch.tensor([[-3.0, 5.0, 4.0, 20.0], [50, 50, 60, 60]])],
                           colour=(1.0, 0.0, 0.0))
    red = drawn[0, 0] > 0
    assert red[5, 0:4].all() and red[5:10, 3].all()  # top and right edges, clipped
    assert red.sum() == 4 + 5 - 1


# ---------------------------------------------------------------------------- files

def test_save_png_atomic(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = vis.save_png(array, tmp_path / "sub" / "x.png")
    assert np.array_equal(np.asarray(Image.open(path)), array)
    assert no_temp_files(path.parent)
    with pytest.raises(ValueError):
        vis.save_png(array.astype(np.float32), tmp_path / "bad.png")


def test_demo_figure_writes_png(out, tmp_path):
    path = vis.demo_figure(out, tmp_path / "demo.png", title="tiny")
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height > 0
    assert no_temp_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["demo.png"]


def test_training_curves_from_tsv_and_frame(tmp_path):
    steps = np.arange(0, 1000, 50)
    frame = pd.DataFrame({"step": steps, "loss": np.linspace(5, 1, len(steps)), "elbo": -np.linspace(5, 1, len(steps)),
                          "log_like": np.linspace(1, 5, len(steps)), "mse": np.linspace(3, 1, len(steps)),
                          "kl_z_what": 1.0, "kl_z_where": 2.0, "kl_z_pres": 0.5, "kl_z_depth": 0.1, "kl_bg": 3.0,
                          "val_ap_50": np.where(steps % 200 == 0, 0.5, np.nan), "empty": np.nan})
    tsv = tmp_path / "metrics.tsv"
    frame.to_csv(tsv, sep="\t", index=False)
    for source, name in ((tsv, "a.png"), (frame.drop(columns=["elbo", "kl_bg"]), "b.png")):
        path = vis.training_curves(source, tmp_path / name)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 0
    empty = vis.training_curves(pd.DataFrame({"step": [0.0], "loss": [math.nan]}), tmp_path / "c.png")
    with Image.open(empty) as image:
        assert image.format == "PNG"
    assert no_temp_files(tmp_path)


def test_tensorboard_images(out, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    vis.tensorboard_images(writer, out, step=3)
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert tags == {"train/#0-separations", "train/1-image", "train/2-reconstruction_overall", "train/3-background"}
    sep = acc.Images("train/#0-separations")[0]
    assert sep.step == 3
    assert (sep.height, sep.width) == (3 * (SIZE + 2) + 2, vis.panel_count(K) * (SIZE + 2) + 2)
    img = acc.Images("train/1-image")[0]
    assert (img.height, img.width) == (SIZE + 4, 3 * (SIZE + 2) + 2)


def test_png_failing_mid_write_leaves_the_previous_file(tmp_path, monkeypatch):
    old = np.zeros((5, 5, 3), np.uint8)
    path = vis.save_png(old, tmp_path / "demo.png")
    before = path.read_bytes()

    def half_then_full_disk(self, f, *args, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        vis.save_png(np.full((5, 5, 3), 255, np.uint8), path)
    assert path.read_bytes() == before and no_temp_files(tmp_path)
