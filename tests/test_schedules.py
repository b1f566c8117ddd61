import pytest

from space.config import ModelConfig
from space.schedules import EVAL_STEP, final_priors, linear_anneal, priors_at


def test_linear_anneal_boundaries():
    # start value up to and including start_step, end value from end_step on
    assert linear_anneal(0, 10, 20, 1.0, 3.0) == 1.0
    assert linear_anneal(10, 10, 20, 1.0, 3.0) == 1.0
    assert linear_anneal(11, 10, 20, 1.0, 3.0) == 1.2  # 1 + (3 - 1) / 10 * 1
    assert linear_anneal(15, 10, 20, 1.0, 3.0) == 2.0
    assert linear_anneal(20, 10, 20, 1.0, 3.0) == 3.0
    assert linear_anneal(10**9, 10, 20, 1.0, 3.0) == 3.0
    # start_step == end_step: a step function at that step
    assert linear_anneal(5, 5, 5, 1.0, 3.0) == 1.0 and linear_anneal(6, 5, 5, 1.0, 3.0) == 3.0


def test_priors_follow_the_originals_switches():
    cfg = ModelConfig(fix_alpha_steps=4000, fix_alpha_value=0.1, bl_off_step=100)
    assert priors_at(cfg, 0).fix_alpha is None  # step 0 is never fixed (truthiness test)
    assert priors_at(cfg, 1).fix_alpha == 0.1
    assert priors_at(cfg, 3999).fix_alpha == 0.1 and priors_at(cfg, 4000).fix_alpha is None
    assert priors_at(cfg, 100).boundary_loss and not priors_at(cfg, 101).boundary_loss  # strict '>'
    final = final_priors(cfg)
    assert final.step == EVAL_STEP and final.tau == cfg.tau_end_value
    assert final.z_pres_prob == cfg.z_pres_end_value and final.z_scale_mean == cfg.z_scale_mean_end_value
    # z_pres schedule of 3d_room_*: 0.1 -> 0.01 over steps 4000..10000
    assert abs(priors_at(ModelConfig(), 7000).z_pres_prob - 0.055) < 1e-12


def test_bg_lr_warm_up_rises_linearly_to_bg_lr():
    from space.config import TrainConfig
    from space.schedules import bg_lr_at

    cfg = TrainConfig(bg_lr=1e-3, bg_lr_warmup_steps=500, bg_lr_warmup_factor=0.3)
    assert bg_lr_at(cfg, 0) == pytest.approx(3e-4)
    assert bg_lr_at(cfg, 250) == pytest.approx(6.5e-4)
    assert bg_lr_at(cfg, 500) == bg_lr_at(cfg, 10_000) == 1e-3
    assert bg_lr_at(TrainConfig(bg_lr=1e-3), 0) == 1e-3  # no warm-up by default
    with pytest.raises(ValueError, match="bg_lr_warmup_factor"):
        TrainConfig(bg_lr_warmup_factor=0.0)
    with pytest.raises(ValueError, match="bg_lr_warmup_steps"):
        TrainConfig(bg_lr_warmup_steps=-1)


def test_lr_decay_falls_linearly_to_its_factor_at_max_steps_on_both_optimisers():
    from space.config import TrainConfig
    from space.schedules import bg_lr_at, fg_lr_at
    cfg = TrainConfig(fg_lr=1e-3, bg_lr=2e-3, max_steps=2000, lr_decay_start=1000, lr_decay_factor=0.1)
    assert fg_lr_at(cfg, 0) == fg_lr_at(cfg, 1000) == 1e-3
    assert fg_lr_at(cfg, 1500) == pytest.approx(0.55e-3)
    assert fg_lr_at(cfg, 2000) == fg_lr_at(cfg, 5000) == pytest.approx(1e-4)
    assert bg_lr_at(cfg, 1500) == pytest.approx(1.1e-3)
    assert bg_lr_at(cfg, 2000) == pytest.approx(2e-4)
    both = TrainConfig(bg_lr=1e-3, bg_lr_warmup_steps=500, max_steps=2000, lr_decay_start=1000, lr_decay_factor=0.5)
    assert bg_lr_at(both, 250) == pytest.approx(6.5e-4)  # warm-up untouched before the decay
    assert bg_lr_at(both, 2000) == pytest.approx(5e-4)
    plain = TrainConfig(fg_lr=1e-5, bg_lr=1e-3, max_steps=2000)  # the original's: constant
    assert fg_lr_at(plain, 1999) == 1e-5 and bg_lr_at(plain, 1999) == 1e-3


@pytest.mark.parametrize("key, value", [("lr_decay_start", -1), ("lr_decay_factor", 0.0), ("lr_decay_factor", 1.5)])
def test_lr_decay_rejects_bad_values_by_name(key, value):
    from space.config import TrainConfig
    with pytest.raises(ValueError, match=f"train.{key}"):
        TrainConfig(**{key: value})
