import pytest

from space.config import ModelConfig, TrainConfig, from_dict, load_yaml, original_config, replace
from space.experiment import load_experiment


@pytest.mark.parametrize("key, value, words", [
    ("G", 5, "one of (4, 8, 16)"),
    ("image_size", 100, "a power of two from 32 on"),
    ("image_size", 16, "a power of two from 32 on"),  # no grid fitted it: "G in []"
    ("K", 0, ">= 1"),
    ("fg_sigma", -0.1, "> 0"),
    ("bg_sigma", 0.0, "> 0"),
    ("z_pres_end_value", 1.5, "probability"),
    ("bg_width", 0.3, "one of"),
    ("glimpse_size", 24, "one of"),
])
def test_invalid_model_values_name_key_value_and_allowed(key, value, words):
    with pytest.raises(ValueError) as error:
        from_dict(ModelConfig, {key: value})
    message = str(error.value)
    assert f"model.{key}" in message and repr(value) in message and words in message


def test_unknown_key_is_named_with_allowed_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) in 'model': grid_sise; allowed keys: .*G"):
        from_dict(ModelConfig, {"grid_sise": 8})


def test_wrong_type_is_rejected():
    with pytest.raises(ValueError, match=r"'model.G': '8'.*type int"):
        from_dict(ModelConfig, {"G": "8"})
    with pytest.raises(ValueError, match=r"'train.eval_on'"):
        from_dict(TrainConfig, {"eval_on": "yes"})


def test_grid_must_fit_image_size():
    with pytest.raises(ValueError, match=r"model.G.*image_size 64"):
        ModelConfig(image_size=64, G=16)
    assert ModelConfig(image_size=64, G=8).num_cells == 64


def test_configs_are_frozen_and_replace_validates():
    cfg = ModelConfig()
    with pytest.raises(Exception):
        cfg.G = 16
    assert replace(cfg, G=16).G == 16
    with pytest.raises(ValueError):
        replace(cfg, K=-1)


def test_original_configs_carry_the_originals_values():
    model, train = original_config("atari_spaceinvaders")
    assert (model.G, model.K, model.fg_sigma, model.bg_sigma) == (16, 3, 0.2, 0.1)
    assert (model.z_scale_std_value, model.fix_alpha_steps, model.fix_alpha_value) == (0.2, 2000, 0.2)
    assert (train.seed, train.batch_size, train.max_steps) == (1, 12, 100000)
    model, _ = original_config("atari_joint")
    assert model.z_pres_end_value == 1e-10 and model.tau_end_value == 2.5
    with pytest.raises(ValueError, match="unknown original configuration 'atari'"):
        original_config("atari")


def test_params_read_exponent_floats_as_yaml_1_2_does(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-09 as a string; DVC (ruamel, YAML 1.2) writes floats that way for
    # `dvc exp run -S exp.rooms.model.z_pres_end_value=1e-9`, which then stopped the stages with
    # "invalid value for 'model.z_pres_end_value': '1e-09'".
    path = tmp_path / "params.yaml"
    path.write_text("exp:\n  e:\n    data: {source: rooms, root: data/x}\n"
                    "    model: {image_size: 64, G: 8, z_pres_end_value: 1e-09, fg_sigma: .25, tau_end_value: 5E-1}\n"
                    "    train: {seed: 1, fg_lr: 1e-4, max_steps: 1_000}\n    pretrained: null\n")
    exp = load_experiment(path, "e")
    assert exp.model.z_pres_end_value == 1e-9
    assert (exp.model.fg_sigma, exp.model.tau_end_value, exp.train.fg_lr) == (0.25, 0.5, 1e-4)
    assert exp.train.max_steps == 1000 and isinstance(exp.train.max_steps, int)
    assert load_yaml("a: [3d_room_small, 1e, e5, inf, '1e-3']")["a"] == ["3d_room_small", "1e", "e5", "inf", "1e-3"]


@pytest.mark.parametrize("key, value, message", [
    ("seed", 1.5, "invalid value for 'data.seed': 1.5; allowed: an integer"),  # was a TypeError traceback
    ("num_val", 0, "invalid value for 'data.num_val': 0; allowed: an integer >= 1 (the data stage generates every split)"),
    ("shadows", "no", "invalid value for 'data.shadows': 'no'; allowed: true or false"),
    ("games", "SpaceInvaders", "invalid value for 'data.games': 'SpaceInvaders'; allowed: null or a non-empty list"),
    ("games", ["Pong", "Pong-v0"], "invalid value for 'data.games': ['Pong', 'Pong-v0']; allowed: a list that names "
                                   "each game once"),
    ("split_fractions", [0.5, 0.5], "invalid value for 'data.split_fractions': [0.5, 0.5]; allowed: three shares"),
    ("split_fractions", [0.9, 0.0, 0.1], "allowed: three shares (train, val, test) > 0 summing to 1 (every split"),
    ("min_size", "0.1", "invalid value for 'data.min_size': '0.1'; allowed: a number"),
    ("root", None, "invalid value for 'data.root': None; allowed: a path"),
])
def test_data_values_name_key_value_and_allowed(key, value, message):
    from space.experiment import DataConfig
    DataConfig(source="rooms", root="data/x")  # the defaults pass
    DataConfig(source="OBJ3D_SMALL", root="data/x", num_val=0)  # a download's counts are not used
    with pytest.raises(ValueError) as error:
        DataConfig(**{"source": "rooms", "root": "data/x", key: value})
    assert message in str(error.value)


@pytest.mark.parametrize("changes, message", [
    ({"clip_norm": float("nan")}, "invalid value for 'train.clip_norm': nan; allowed: a number >= 0"),
    ({"seed": -1}, "invalid value for 'train.seed': -1; allowed: an integer in [0, 2**32 - 1]"),
    ({"seed": 2 ** 32}, "invalid value for 'train.seed': 4294967296"),
    ({"max_steps": 4, "lr_decay_start": 10}, "invalid value for 'train.lr_decay_start': 10; allowed: 0 (no decay) or "
                                             "a step before train.max_steps = 4"),
])
def test_train_values_that_would_fail_later_or_do_nothing_are_named(changes, message):
    with pytest.raises(ValueError) as error:
        TrainConfig(**changes)
    assert message in str(error.value)
