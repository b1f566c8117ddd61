import copy

import pytest
import torch

import space
from conftest import ORIGINAL_NAMES, synthesise_original
from space.checkpoint import CheckpointError, load_original_checkpoint, read_checkpoint, save_checkpoint
from space.model import build_model, build_optimizers


@pytest.mark.parametrize("name", ORIGINAL_NAMES)
def test_original_checkpoint_loads_every_key(name, tmp_path):
    path = tmp_path / f"{name}.pth"
    state = synthesise_original(name, path)
    model = build_model(name)
    ckpt = load_original_checkpoint(path, model)
    assert ckpt["global_step"] == 8000 and ckpt["epoch"] == 3
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key
    # the optimiser states load into our optimisers (same parameter order)
    fg, bg = build_optimizers(model)
    fg.load_state_dict(ckpt["optimizer_fg"])
    bg.load_state_dict(ckpt["optimizer_bg"])
    # space.load names the config after the file stem, as the pretrained files are named
    assert space.load(path).cfg == model.cfg


def test_wrong_shape_missing_and_extra_keys_are_listed_in_one_error(tmp_path):
    path = tmp_path / "3d_room_small.pth"
    state = synthesise_original("3d_room_small", path)
    state["fg_module.img_encoder.offset"] = torch.zeros(2, 16, 16)  # a G=16 checkpoint
    state["fg_module.extra.weight"] = torch.zeros(1)
    del state["bg_module.z_mask_0"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as error:
        load_original_checkpoint(path, build_model("3d_room_small"))
    message = str(error.value)
    assert str(path) in message and "G=8, K=5" in message
    assert "1 missing keys:\n    bg_module.z_mask_0" in message
    assert "1 unexpected keys:\n    fg_module.extra.weight" in message
    assert "fg_module.img_encoder.offset: checkpoint (2, 16, 16), model (2, 8, 8)" in message


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    path = tmp_path / "atari.pth"
    synthesise_original("3d_room_small", path)  # G = 8; K > 1 does not change any shape
    with pytest.raises(CheckpointError, match=r"1 shape mismatches:\n    fg_module.img_encoder.offset"):
        load_original_checkpoint(path, build_model("atari_spaceinvaders"))


def test_not_a_checkpoint_and_pickled_code_are_refused(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth: not a PyTorch checkpoint"):
        read_checkpoint(text)
    # a text file given as `pretrained` was called "pickled code" (torch reads '#' as an opcode)
    params = tmp_path / "params.yaml"
    params.write_text("# Every knob of the pipeline.\nexperiments: [rooms]\n")
    with pytest.raises(CheckpointError, match=r"params.yaml: not a PyTorch checkpoint \(neither a zip archive nor a "
                                              r"pickle: it starts with b'# Ev'\)"):
        read_checkpoint(params)
    legacy = tmp_path / "legacy.pth"  # the format of the original's files (PyTorch < 1.6)
    torch.save({"model": {"w": torch.ones(2)}}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(legacy)["model"]["w"], torch.ones(2))

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="evil.pth: refused: the file carries pickled code"):
        read_checkpoint(evil)
    torch.save({"model": {}, "x": Payload()}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="evil.pth: refused: the file carries pickled code"):
        read_checkpoint(evil)
    other = tmp_path / "list.pth"
    torch.save([1, 2], other)
    with pytest.raises(CheckpointError, match="not a SPACE checkpoint"):
        read_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pth")


def test_our_checkpoint_carries_its_config(tmp_path):
    cfg = space.ModelConfig(image_size=64, G=4, K=2, bg_width=0.5, glimpse_size=16)
    model = space.Space(cfg)
    path = tmp_path / "model.pth"
    save_checkpoint(path, model, build_optimizers(model), step=12, epoch=1)
    loaded = space.load(path)
    assert loaded.cfg == cfg and not loaded.training
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key
    assert read_checkpoint(path)["global_step"] == 12
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_original_checkpoint_without_a_name_asks_for_one(tmp_path):
    path = tmp_path / "weights.pth"
    synthesise_original("3d_room_small", path)
    with pytest.raises(CheckpointError, match="carries no config; name its configuration"):
        space.load(path)
    assert space.load(path, original="3d_room_small").cfg.G == 8


def test_weights_saved_bare_or_from_data_parallel_load(tmp_path, caplog):
    """torch.save(model.state_dict()) without the wrapper dict, and keys behind DataParallel's
    'module.', are read as the weights they are; a misfit lists at most 20 keys per kind."""
    state = synthesise_original("3d_room_small", tmp_path / "3d_room_small.pth")
    bare, wrapped = tmp_path / "bare" / "3d_room_small.pth", tmp_path / "dp" / "3d_room_small.pth"
    bare.parent.mkdir()
    wrapped.parent.mkdir()
    torch.save(state, bare)
    torch.save({"model": {f"module.{key}": value for key, value in state.items()}}, wrapped)
    for path in (bare, wrapped):
        loaded = space.load(path).state_dict()
        assert all(torch.equal(loaded[key], value.to(loaded[key].dtype)) for key, value in state.items()), path
    assert "holds a bare state_dict" in caplog.text
    torch.save({"model": {f"other.{key}": value for key, value in state.items()}}, wrapped)
    with pytest.raises(CheckpointError) as error:
        space.load(wrapped)
    message = str(error.value)
    assert f"{len(state)} missing keys" in message and f"... and {len(state) - 20} more" in message
    assert len(message.splitlines()) < 50


def test_a_checkpoint_of_ours_that_this_version_cannot_read_names_the_file(tmp_path):
    model = build_model("3d_room_small")
    path = tmp_path / "ours.pth"
    save_checkpoint(path, model, None, step=0, epoch=0)
    ckpt = torch.load(path, weights_only=True)
    for change, expected in (
            (lambda c: c["config"]["model"].update(old_knob=1), r"ours.pth: the settings stored in this checkpoint "
                                                                r"do not fit this version of the code: unknown key\(s\) "
                                                                r"in 'model': old_knob"),
            (lambda c: c.update(format="space-dvc/999"), r"ours.pth: checkpoint format 'space-dvc/999'; this "
                                                         r"version reads 'space-dvc/1'"),
            (lambda c: c.update(config=None), r"ours.pth: its 'config' holds no 'model' settings")):
        changed = copy.deepcopy(ckpt)
        change(changed)
        torch.save(changed, path)
        with pytest.raises(CheckpointError, match=expected):
            space.load(path)
    original = tmp_path / "renamed.pth"
    synthesise_original("3d_room_small", original)
    with pytest.raises(CheckpointError, match=r"renamed.pth: original='bogus' is not one of the original's "
                                              r"configurations \(3d_room_large, "):
        space.load(original, original="bogus")
