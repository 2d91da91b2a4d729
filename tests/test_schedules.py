"""llm.c's training controls: the wsd schedule and outlier skipping, each
against the definition written out here independently."""
from __future__ import annotations

import math

import numpy as np
import pytest

from llmpy.optim import lr_at
from llmpy.train import Outliers


@pytest.mark.parametrize("total, warmup, frac", [(100, 10, 0.2), (37, 0, 0.5), (10, 3, 1.0)])
def test_wsd_is_warmup_stable_then_one_minus_sqrt_decay(total, warmup, frac):
    max_lr, min_frac = 6e-4, 0.1
    decay_steps = max(1, round(frac * total))
    start = max(warmup, total - decay_steps)
    for step in range(total):
        if step < warmup:
            want = max_lr * (step + 1) / warmup
        elif step < start:
            want = max_lr
        else:
            g = (step - start) / max(1, total - 1 - start)
            want = max_lr * min_frac + (max_lr - max_lr * min_frac) * (1 - math.sqrt(g))
        assert lr_at(step, max_lr, total, warmup, "wsd", min_frac, frac) == pytest.approx(want, rel=1e-12), step
    assert lr_at(total - 1, max_lr, total, warmup, "wsd", min_frac, frac) == pytest.approx(max_lr * min_frac)


def test_outliers_skip_what_lies_z_std_above_the_window_mean():
    rng = np.random.default_rng(0)
    det = Outliers(loss_z=3.0, norm_z=0.0)
    losses = list(rng.normal(3.0, 0.1, Outliers.WINDOW))
    for x in losses:                                   # the window fills: nothing is judged before
        assert det.accept(x, 1.0)
    mean, std = np.mean(losses), np.std(losses)        # population std, as the detector's
    assert det.accept(mean + 2.9 * std, 1.0)           # within 3 std: kept (and enters the window)
    window = (losses + [mean + 2.9 * std])[-Outliers.WINDOW:]
    mean, std = np.mean(window), np.std(window)
    assert not det.accept(mean + 3.1 * std, 1.0)       # beyond: skipped, and kept out of the window
    assert "std above its running mean" in det.last_reason
    assert det.history["loss"] == pytest.approx(window)
    assert Outliers(0.0, 0.0).accept(1e9, 1e9) and not Outliers(0.0, 0.0).active


def test_outliers_state_survives_a_checkpoint():
    det = Outliers(0.0, 2.0)
    for i in range(10):
        det.accept(1.0, float(i))
    again = Outliers(0.0, 2.0)
    again.load_state_dict(det.state_dict())
    assert again.history == det.history
