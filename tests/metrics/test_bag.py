import math

import numpy as np
import pytest
import torch

from graphmil.metrics import bag_metrics, bag_probabilities


def pairwise_auc(p, y):
    pos, neg = p[y == 1], p[y == 0]
    return np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])


def test_binary_one_logit_against_hand_formulas():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20, 1))
    y = rng.integers(0, 2, 20)
    m = bag_metrics(torch.tensor(z), torch.tensor(y))
    p = 1 / (1 + np.exp(-z[:, 0]))
    pred = (p >= 0.5).astype(int)
    tp, fp, fn = ((pred == 1) & (y == 1)).sum(), ((pred == 1) & (y == 0)).sum(), ((pred == 0) & (y == 1)).sum()
    assert m["auroc"] == pytest.approx(pairwise_auc(p, y))
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_two_logits_use_softmax_class1():
    z = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 0.2], [1.0, 0.5]])
    p = bag_probabilities(z)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(z[:, 1] - z[:, 0]))))
    m1 = bag_metrics(z, [1, 0, 1, 0])
    m2 = bag_metrics((z[:, 1] - z[:, 0])[:, None], [1, 0, 1, 0])
    assert m1 == pytest.approx(m2)


def test_multiclass_macro():
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(1)
    z = rng.normal(size=(30, 3))
    y = np.arange(30) % 3
    m = bag_metrics(z, y)
    e = np.exp(z)
    p = e / e.sum(1, keepdims=True)
    # macro one-vs-rest AUROC by hand
    aucs = [pairwise_auc(p[:, c], (y == c).astype(int)) for c in range(3)]
    assert m["auroc"] == pytest.approx(np.mean(aucs))
    assert m["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    assert m["f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert roc_auc_score(y, p, multi_class="ovr") == pytest.approx(m["auroc"])


def test_macro_f1_option_for_binary():
    z = np.array([[2.0], [-1.0], [0.5], [-0.2], [1.0]])
    y = np.array([1, 0, 0, 0, 1])
    pred = (z[:, 0] >= 0).astype(int)
    f1 = []
    for c in (0, 1):
        tp = ((pred == c) & (y == c)).sum()
        fp = ((pred == c) & (y != c)).sum()
        fn = ((pred != c) & (y == c)).sum()
        f1.append(2 * tp / (2 * tp + fp + fn))
    assert bag_metrics(z, y, average="macro")["f1"] == pytest.approx(np.mean(f1))


def test_threshold():
    z = np.array([[0.0], [0.0]])  # p = 0.5
    assert bag_metrics(z, [1, 0], threshold=0.5)["recall"] == 1.0
    assert bag_metrics(z, [1, 0], threshold=0.6)["recall"] == 0.0


def test_one_class_gives_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="undefined"):
        m = bag_metrics(np.array([[1.0], [2.0]]), [1, 1])
    assert math.isnan(m["auroc"]) and m["accuracy"] == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="labels"):
        bag_metrics(np.zeros((3, 1)), [0, 1])
    with pytest.raises(ValueError, match="average"):
        bag_metrics(np.zeros((2, 1)), [0, 1], average="micro")


@pytest.mark.parametrize("C", [2, 3])
def test_classification_summary_equals_sklearn(C):
    """The bootstrap's fast metrics against scikit-learn, with tied scores."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, precision_score,
                                 recall_score, roc_auc_score)

    from graphmil.metrics import classification_summary

    rng = np.random.default_rng(C)
    y = rng.integers(0, C, 60)
    if C == 2:
        p = np.round(rng.random(60), 1)  # rounded: many ties
        pred = (p >= 0.5).astype(int)
        ref_auc, kw = roc_auc_score(y, p), dict(average="binary", zero_division=0)
    else:
        z = rng.normal(size=(60, C))
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        pred = p.argmax(1)
        ref_auc, kw = roc_auc_score(y, p, multi_class="ovr", average="macro"), dict(average="macro", zero_division=0)
    m = classification_summary(y, p)
    assert m["auroc"] == pytest.approx(ref_auc)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred, **kw))
    assert m["precision"] == pytest.approx(precision_score(y, pred, **kw))
    assert m["recall"] == pytest.approx(recall_score(y, pred, **kw))
    assert np.isnan(classification_summary(np.zeros(5), np.linspace(0, 1, 5))["auroc"])


def test_bootstrap_ci_resamples_groups_and_brackets_the_value():
    from graphmil.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    groups = np.repeat(np.arange(10), 4)
    ci = bootstrap_ci(lambda idx: float(x[idx].mean()), 40, groups=groups, num_samples=400, seed=1)
    assert ci["value"] == pytest.approx(x.mean()) and ci["low"] < x.mean() < ci["high"]
    # a group drawn brings all its items: with one group per item value, replicate means are
    # means of whole groups -> the interval matches a bootstrap over the 10 group means
    gm = x.reshape(10, 4).mean(1)
    r = np.random.default_rng(1)
    ref = [gm[r.integers(0, 10, 10)].mean() for _ in range(400)]
    assert ci["low"] == pytest.approx(np.quantile(ref, 0.025)) and ci["high"] == pytest.approx(np.quantile(ref, 0.975))
    d = bootstrap_ci(lambda idx: {"a": float(x[idx].mean()), "nan": float("nan")}, 40, num_samples=20)
    assert d["nan"]["num_samples"] == 0 and np.isnan(d["nan"]["low"]) and d["a"]["num_samples"] == 20
