"""The background-failure rule, on indicator values measured from real runs of the default setup."""
import pytest

from space.evaluation import bg_failure_verdict

# (fg_explained, mean_objects, alpha_coverage) measured on 200 generated test rooms, deterministic
# mode, from three 64 x 64 runs: a working one (2500 steps), one whose background took the
# objects (K = 4, 1000 steps) and one whose foreground pasted objects everywhere
# (fix_alpha for 1000 steps).
WORKING = (0.3496, 2.595, 0.0451)
BACKGROUND_TOOK_OBJECTS = (-4.1e-9, 0.0, 9.7e-11)
FOREGROUND_TOOK_OVER = (-0.1869, 11.64, 0.2821)


def test_working_run_is_not_a_failure():
    failed, reason = bg_failure_verdict(*WORKING)
    assert not failed and "2.60 objects per image" in reason


def test_background_absorbing_the_objects_is_caught():
    failed, reason = bg_failure_verdict(*BACKGROUND_TOOK_OBJECTS)
    assert failed and reason.startswith("the background absorbed the objects")


def test_foreground_taking_over_is_caught():
    failed, reason = bg_failure_verdict(*FOREGROUND_TOOK_OVER)
    assert failed and reason.startswith("the foreground took over the background")
    failed, reason = bg_failure_verdict(0.6, 1.0, 0.7)  # a few huge objects covering the image
    assert failed and reason.startswith("the foreground took over the background")


@pytest.mark.parametrize("fg_explained, mean_objects", [(0.04, 2.0), (0.3, 0.2)])
def test_thresholds(fg_explained, mean_objects):
    failed, reason = bg_failure_verdict(fg_explained, mean_objects, 0.05)
    assert failed and reason.startswith("the background absorbed the objects")
