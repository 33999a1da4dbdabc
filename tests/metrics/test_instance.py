import math

import numpy as np
import pytest

from graphmil.metrics import (attention_entropy_summary, best_threshold, instance_auroc,
                              instance_metrics, per_bag_instance_auroc, sm_instance_auroc)


def pairwise_auc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])


def _data(seed=0, n=40):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n)
    y = rng.integers(-1, 2, n)
    idx = np.sort(rng.integers(0, 4, n))
    return s, y, idx


def test_pooled_auroc_ignores_unknown():
    s, y, _ = _data()
    keep = y >= 0
    assert instance_auroc(s, y) == pytest.approx(pairwise_auc(s[keep], y[keep]))


def test_sm_protocol_by_hand():
    s, y, idx = _data(1)
    pred = np.array([1, 0, 1, 0])
    s2 = s.copy()
    s2[pred[idx] == 0] = s.min()
    keep = y >= 0
    assert sm_instance_auroc(s, y, idx, pred) == pytest.approx(pairwise_auc(s2[keep], y[keep]))
    # every bag predicted positive: the plain pooled AUROC
    assert sm_instance_auroc(s, y, idx, np.ones(4)) == pytest.approx(instance_auroc(s, y))


def test_best_threshold_brute_force():
    s, y, _ = _data(2)
    keep = y >= 0
    s, y = s[keep], y[keep]
    best = max(((s >= t)[y == 1].mean() * (1 - (s >= t)[y == 0].mean()), t) for t in s)
    t, j = best_threshold(s, y)
    assert j == pytest.approx(best[0])
    assert ((s >= t)[y == 1].mean() * (1 - (s >= t)[y == 0].mean())) == pytest.approx(best[0])


def test_per_bag_mean_skips_one_class_bags():
    s = np.array([0.1, 0.9, 0.5, 0.2, 0.3, 0.8, 0.7, 0.1])
    y = np.array([0, 1, 1, 0, 0, 0, 1, 0])
    idx = np.array([0, 0, 0, 1, 1, 2, 2, 2])  # bag 1 has negatives only
    a0 = pairwise_auc(s[:3], y[:3])
    a2 = pairwise_auc(s[5:], y[5:])
    assert per_bag_instance_auroc(s, y, idx) == pytest.approx((a0 + a2) / 2)


def test_degenerate_cases_are_nan_with_warning():
    with pytest.warns(RuntimeWarning):
        assert math.isnan(instance_auroc([0.1, 0.2], [1, 1]))
    with pytest.warns(RuntimeWarning):
        assert math.isnan(instance_auroc([0.1, 0.2], [-1, -1]))
    with pytest.warns(RuntimeWarning):
        assert math.isnan(per_bag_instance_auroc([0.1, 0.2], [1, 0], [0, 1]))
    assert instance_metrics([0.1, 0.2], [-1, -1], [0, 0]) == {}


def test_entropy_summary_against_loop():
    rng = np.random.default_rng(3)
    idx = np.array([0, 0, 0, 1, 2, 2])
    a = rng.random((6, 2))
    for b in range(3):
        a[idx == b] /= a[idx == b].sum(0)
    out = attention_entropy_summary(a, idx)
    ent = [np.mean([-(a[idx == b, h] * np.log(a[idx == b, h])).sum() for h in range(2)]) for b in range(3)]
    norm = [ent[0] / np.log(3), 0.0, ent[2] / np.log(2)]
    assert out["entropy_mean"] == pytest.approx(np.mean(ent))
    assert out["entropy_std"] == pytest.approx(np.std(ent))
    assert out["entropy_norm_mean"] == pytest.approx(np.mean(norm))


def test_length_mismatch():
    with pytest.raises(ValueError, match="y_inst"):
        instance_auroc([0.1, 0.2, 0.3], [0, 1])
