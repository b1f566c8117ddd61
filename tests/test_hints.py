import math

import pytest

from space.data import Obj3dDataset, generate_rooms
from space.hints import main, suggest


def test_hints_recover_the_generators_object_size(tmp_path, capsys):
    root = generate_rooms(tmp_path / "rooms", image_size=64, num_train=1, num_val=60, num_test=1, min_objects=1,
                          max_objects=3, min_size=0.15, max_size=0.25, seed=4, progress=False)
    dataset = Obj3dDataset(root, "val", image_size=64)
    hints = suggest([dataset.boxes(i) for i in range(len(dataset))], 64)
    size = 1 / (1 + math.exp(-hints.values["z_scale_mean_end_value"]))
    # the generator draws object sides in [0.15, 0.25] of the image (mean 0.2); occlusion only shrinks
    # visible boxes, so the proposal must lie within 20 % of 0.2
    assert abs(size - 0.2) < 0.04, size
    assert hints.values["z_scale_mean_start_value"] > hints.values["z_scale_mean_end_value"]
    assert hints.values["G"] == 8  # 8-px cells for ~13-px objects at 64 px, little crowding
    assert any("median object side" in reason for reason in hints.reasons) and not hints.unknown


def test_without_boxes_it_says_what_it_cannot_know():
    hints = suggest(None, 128)
    assert hints.values["G"] == 8 and hints.values["z_scale_mean_end_value"] == -2.0
    text = hints.text()
    assert "Cannot be known from this data:" in text and "object size" in text and "objects per image" in text


def test_command_line_with_measured_boxes(capsys):
    main(["--boxes", "20,20,16,16", "80,60,16,16", "--image-size", "128"])
    out = capsys.readouterr().out
    assert "z_scale_mean_end_value: -1.95" in out  # logit(16 / 128) = -1.946


def test_each_boxes_group_is_one_image(capsys):
    # before: every box counted as an image of its own ("2 boxes in 2 images", 1.00 objects per image)
    main(["--boxes", "20,20,16,16", "80,60,16,16", "--image-size", "128"])
    out = capsys.readouterr().out
    assert "2 boxes in 1 image;" in out and "2.00 objects per image (2-2)" in out
    main(["--boxes", "20,20,16,16", "80,60,16,16", "--boxes", "40,100,16,16", "--image-size", "128"])
    out = capsys.readouterr().out
    assert "3 boxes in 2 images" in out and "1.50 objects per image (1-2)" in out


def test_boxes_measured_on_a_photo_give_the_same_hints_at_the_models_size(capsys):
    main(["--boxes", "156.25,156.25,125,125", "625,468.75,125,125", "--image-size", "1000", "--model-size", "128"])
    assert "z_scale_mean_end_value: -1.95" in capsys.readouterr().out  # the boxes above, scaled by 1000 / 128


def test_command_line_refusals_name_the_box_or_size_at_fault(capsys):
    refusals = {  # before: negative sizes were taken in, and an image size no grid fits raised "min() arg is empty"
        ("--boxes", "40,52,-18,20"): "bad box '40,52,-18,20': expected cx,cy,w,h in pixels, finite, with width",
        ("--boxes", "40,52,18,nan"): "bad box '40,52,18,nan'",
        ("--boxes", "40,52,18,20", "--image-size", "1000"):
            "no grid fits an image size of 1000: the model's cells are 8, 16 or 32 pixels wide and G is one of "
            "(4, 8, 16), so its image_size is one of [32, 64, 128, 256, 512]; for boxes measured on an image of "
            "another size, give the model's as --model-size",
    }
    for argv, message in refusals.items():
        with pytest.raises(SystemExit) as stop:
            main(list(argv))
        assert stop.value.code == 1
        assert message in capsys.readouterr().err


def test_an_experiment_gives_the_boxes_of_every_split_by_default(tmp_path, capsys, monkeypatch):
    import yaml

    from conftest import ROOT

    monkeypatch.chdir(tmp_path)
    generate_rooms(tmp_path / "r", image_size=64, num_train=5, num_val=3, num_test=2, seed=1, progress=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["exp"]["rooms"]["data"].update(root="r", num_train=5, num_val=3, num_test=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    main(["--experiment", "rooms"])
    assert "boxes in 10 images" in capsys.readouterr().out
    main(["--experiment", "rooms", "--split", "val"])
    assert "boxes in 3 images" in capsys.readouterr().out
