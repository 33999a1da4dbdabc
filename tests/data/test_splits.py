import numpy as np
import pytest
import torch

from graphmil.data import splits as S
from graphmil.data.splits import Split, splits_from_masks, stratified_kfold


def _labels(n_pos=23, n_neg=37, seed=0):
    y = np.array([1] * n_pos + [0] * n_neg)
    return np.random.default_rng(seed).permutation(y)


def _check_partition(folds, n, k, repeats=1):
    assert len(folds) == k * repeats
    for r in range(repeats):
        fr = [f for f in folds if f.repeat == r]
        assert [f.fold for f in fr] == list(range(k))
        tests = np.concatenate([f.test for f in fr])
        assert sorted(tests.tolist()) == list(range(n))  # every bag tested exactly once
        for f in fr:
            parts = [set(f.train), set(f.val), set(f.test)]
            assert parts[0].isdisjoint(parts[1]) and parts[0].isdisjoint(parts[2]) and parts[1].isdisjoint(parts[2])
            assert set().union(*parts) == set(range(n))  # covering
            assert all(p == sorted(p) for p in (f.train, f.val, f.test))


@pytest.mark.parametrize("k", [2, 5, 10])
def test_disjoint_covering_and_stratified(k):
    y = _labels()
    folds = stratified_kfold(y, k=k, seed=0)
    _check_partition(folds, len(y), k)
    for f in folds:
        for c in (0, 1):
            n_c = int((y == c).sum())
            assert abs(int((y[f.test] == c).sum()) - n_c / k) <= 1


def test_deterministic_and_seed_dependent():
    y = _labels()
    a = stratified_kfold(y, k=5, seed=3, val_fraction=0.2, repeats=2)
    b = stratified_kfold(torch.tensor(y), k=5, seed=3, val_fraction=0.2, repeats=2)
    assert a == b
    c = stratified_kfold(y, k=5, seed=4)
    assert [f.test for f in c] != [f.test for f in a[:5]]
    # repeat r uses seed + r
    assert [f.test for f in a[5:]] == [f.test for f in stratified_kfold(y, k=5, seed=4)]


def test_repeats_are_each_a_partition():
    y = _labels()
    folds = stratified_kfold(y, k=4, seed=0, repeats=3)
    _check_partition(folds, len(y), 4, repeats=3)
    assert [f.test for f in folds[:4]] != [f.test for f in folds[4:8]]


def test_inner_validation_split_is_stratified():
    y = _labels(40, 60)
    folds = stratified_kfold(y, k=5, seed=0, val_fraction=0.25)
    _check_partition(folds, len(y), 5)
    for f in folds:
        n_tr_val = len(f.train) + len(f.val)
        assert len(f.val) == int(np.ceil(0.25 * n_tr_val))
        frac = (y[f.val] == 1).mean()
        assert abs(frac - 0.4) < 0.1


def test_groups_never_split():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), rng.integers(1, 4, size=30))  # patients with 1-3 slides
    patient_label = rng.integers(0, 2, size=30)
    y = patient_label[groups]
    for val_fraction in (0.0, 0.25):
        folds = stratified_kfold(y, k=5, seed=0, groups=[f"case{g}" for g in groups], val_fraction=val_fraction)
        _check_partition(folds, len(y), 5)
        for f in folds:
            where = {}
            for part, idx in (("train", f.train), ("val", f.val), ("test", f.test)):
                for i in idx:
                    assert where.setdefault(groups[i], part) == part, f"group {groups[i]} split"
            if val_fraction:
                assert len(f.val) > 0
        # roughly stratified: each test fold holds both classes
        assert all(len(set(y[f.test].tolist())) == 2 for f in folds)


def test_string_labels_and_column_vector():
    y = np.array(["tumour", "normal"] * 10)
    a = stratified_kfold(y, k=5, seed=0)
    b = stratified_kfold((y == "tumour").astype(int)[:, None], k=5, seed=0)
    _check_partition(a, 20, 5)
    assert [f.test for f in a] == [f.test for f in stratified_kfold(np.where(y == "normal", 0, 1), k=5, seed=0)]
    assert [f.test for f in b] == [f.test for f in a]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(k=1), "'k'"),
        (dict(k=6), "smallest class"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(repeats=0), "repeats"),
        (dict(groups=[0, 1, 2]), "groups"),
    ],
)
def test_errors(kw, match):
    y = [0] * 5 + [1] * 10
    with pytest.raises(ValueError, match=match):
        stratified_kfold(y, **kw)


def test_error_single_class_and_too_few_groups():
    with pytest.raises(ValueError, match="single class"):
        stratified_kfold([1] * 10, k=2)
    with pytest.raises(ValueError, match="number of groups"):
        stratified_kfold([0, 1] * 6, k=5, groups=[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_kfold([0, 0, 1, 1, 1, 1], k=2, val_fraction=0.5)


def test_splits_from_masks():
    rng = np.random.default_rng(0)
    m = rng.random((2, 3, 11)) < 0.7
    folds = splits_from_masks(m)
    assert len(folds) == 6
    for f in folds:
        assert f.train == np.flatnonzero(m[f.repeat, f.fold]).tolist()
        assert f.test == np.flatnonzero(~m[f.repeat, f.fold]).tolist()
        assert f.val == []
    assert len(splits_from_masks(m[0])) == 3
    with pytest.raises(ValueError, match="boolean"):
        splits_from_masks(m.astype(int))


def test_split_repr():
    assert repr(Split([0, 1], [2], [3], fold=1, repeat=0)) == "Split(repeat=0, fold=1, train=2, val=1, test=1)"
    import graphmil.data

    assert graphmil.data.stratified_kfold is stratified_kfold and "Split" in S.__all__
