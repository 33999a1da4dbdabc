"""Negative key bank (CUR leverage scores) of CASii against a numpy SVD oracle."""

import warnings

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from graphmil import make_bag
from graphmil.nn.casii import (
    KeySelection,
    is_negative_bag,
    leverage_scores,
    negative_bags_from_split,
    select_negative_keys,
)


def oracle_leverage(x: np.ndarray):
    """Paper definition with numpy: A = X^T (D x n), right singular vectors, numpy's rank rule."""
    k = int(np.linalg.matrix_rank(x))  # float32 input -> float32 eps tolerance
    _, _, vt = np.linalg.svd(x.astype(np.float64).T, full_matrices=False)
    if k == 0:
        return np.zeros(x.shape[0]), 0
    return (vt[:k] ** 2).sum(0) / k, k


def oracle_keys(bags, t):
    keys = []
    for x in bags:
        x = x.numpy()
        lev, k = oracle_leverage(x)
        order = np.argsort(-np.round(lev * k, 9), kind="stable")[: min(k, t)]  # ties: leverage to 9 decimals
        keys.append(x[order])
    return np.concatenate(keys)


def low_rank(n, d, r, g):
    return (torch.randn(n, r, generator=g) @ torch.randn(r, d, generator=g)).float()


@pytest.fixture
def bags():
    g = torch.Generator().manual_seed(1)
    d = 24
    return [
        torch.randn(80, d, generator=g),            # full rank, n > D (Gram path)
        low_rank(60, d, 7, g),                      # rank-deficient, n > D
        torch.randn(10, d, generator=g),            # n < D, full rank: every score 1/k, ties
        low_rank(15, d, 4, g),                      # rank-deficient, n < D
        torch.randn(3, d, generator=g) * 1e3,       # n < t
        torch.cat([low_rank(20, d, 3, g)] * 2),     # duplicated rows (exact ties)
    ]


@pytest.mark.parametrize("method", ["auto", "svd", "gram"])
def test_leverage_scores_match_numpy_svd(bags, method):
    for x in bags:
        if method == "gram" and x.size(0) < x.size(1):
            continue  # Gram is the n > D route; for n < D it cannot resolve float64 precision
        lev, k = leverage_scores(x, method=method)
        ref, k_ref = oracle_leverage(x.numpy())
        assert k == k_ref
        np.testing.assert_allclose(lev.numpy(), ref, atol=1e-9)
        assert abs(float(lev.sum()) - 1.0) < 1e-9  # sum_j s_j = 1


@pytest.mark.parametrize("t", [1, 5, 50])
def test_keys_equal_numpy_oracle(bags, t):
    keys = select_negative_keys(bags, t=t, progress=False)
    ref = oracle_keys(bags, t)
    assert keys.dtype == torch.float32
    assert keys.shape == ref.shape
    assert torch.equal(keys, torch.from_numpy(ref))


def test_key_info_and_tie_break_by_order(bags):
    info = select_negative_keys(bags, t=5, progress=False, return_info=True)
    assert isinstance(info, KeySelection)
    assert info.ranks == [24, 7, 10, 4, 3, 3]
    # full rank n <= D: every leverage is 1/k, so the first t instances in original order
    sel = info.instance_index[info.bag_index == 2]
    assert sel.tolist() == [0, 1, 2, 3, 4]
    assert info.instance_index[info.bag_index == 4].tolist() == [0, 1, 2]
    for b, i, key in zip(info.bag_index, info.instance_index, info.keys):
        assert torch.equal(key, bags[b][i])
    # duplicated rows have equal scores: the earlier copy comes first
    dup = info.instance_index[info.bag_index == 5].tolist()
    lev, k = leverage_scores(bags[5])
    h = (lev * k).numpy()
    assert np.allclose(h[:20], h[20:], atol=1e-12)  # the copies have the same leverage
    assert dup[0] < 20 and dup[1] == dup[0] + 20 and dup[2] < 20  # tied copies: original order


def test_rank_tolerance_override():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    x[:, 7] = x[:, 6] + 1e-3 * torch.randn(40, generator=g)  # full rank for float32, rank 7 at rtol 1e-2
    _, k = leverage_scores(x)
    assert k == int(np.linalg.matrix_rank(x.numpy())) == 8
    x64 = x.numpy().astype(np.float64)
    _, k = leverage_scores(x, rtol=1e-2)
    assert k == int(np.linalg.matrix_rank(x64, tol=1e-2 * np.linalg.norm(x64, 2))) == 7


def test_accepts_data_datasets_and_generators(bags):
    data = [make_bag(x, y=0, slide_id=f"s{i}") for i, x in enumerate(bags)]
    ref = select_negative_keys(bags, t=4, progress=False)
    assert torch.equal(select_negative_keys(data, t=4, progress=False), ref)
    assert torch.equal(select_negative_keys((d for d in data), t=4, progress=True), ref)
    assert torch.equal(select_negative_keys([x.numpy() for x in bags], t=4, progress=False), ref)


def test_bad_bags_are_reported_not_used(bags):
    nan = bags[0].clone()
    nan[3, 2] = float("nan")
    data = [Data(x=bags[1], y=torch.tensor([0]), slide_id="ok"),
            Data(x=nan, y=torch.tensor([0]), slide_id="slide_nan"),
            Data(x=torch.zeros(0, 24), y=torch.tensor([0]), slide_id="slide_empty"),
            Data(x=torch.zeros(5, 24), y=torch.tensor([0]), slide_id="slide_zero")]
    with pytest.warns(UserWarning) as rec:
        info = select_negative_keys(data, t=50, progress=False, return_info=True)
    assert [str(w.message) for w in rec] == [
        "select_negative_keys: skipping bag 1 (slide_nan): NaN/Inf features",
        "select_negative_keys: skipping bag 2 (slide_empty): no instances",
        "select_negative_keys: skipping bag 3 (slide_zero): rank 0 (all-zero features)",
    ]
    assert [(p, s) for p, s, _ in info.skipped] == [(1, "slide_nan"), (2, "slide_empty"), (3, "slide_zero")]
    assert torch.equal(info.keys, select_negative_keys([bags[1]], t=50, progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no usable bag"):
            select_negative_keys(data[1:], progress=False)
    with pytest.raises(ValueError, match="no usable bag"):
        select_negative_keys([], progress=False)


def test_errors(bags):
    with pytest.raises(ValueError, match="not a single tensor"):
        select_negative_keys(bags[0])
    with pytest.raises(ValueError, match="'t'"):
        select_negative_keys(bags, t=0)
    with pytest.raises(ValueError, match="features"):
        select_negative_keys([bags[0], torch.randn(4, 5)], progress=False)
    with pytest.raises(ValueError, match="negative bags only"):
        select_negative_keys([make_bag(bags[0], y=1, slide_id="tumor_1")], progress=False)
    with pytest.raises(ValueError, match="Batch of 2 bags"):
        select_negative_keys([Batch.from_data_list([make_bag(bags[0], y=0), make_bag(bags[1], y=0)])])
    with pytest.raises(ValueError, match="'x'"):
        leverage_scores(torch.randn(4))
    with pytest.raises(ValueError, match="'method'"):
        leverage_scores(bags[0], method="qr")


def test_negative_bags_from_split_training_fold_rule():
    g = torch.Generator().manual_seed(0)
    ds = [make_bag(torch.randn(6, 4, generator=g), y=i % 3 == 0, slide_id=str(i)) for i in range(9)]
    train = [0, 1, 2, 3, 4, 5]
    got = [b.slide_id for b in negative_bags_from_split(ds, train)]
    assert got == ["1", "2", "4", "5"]  # negatives of the training split only (6..8 never seen)
    assert [b.slide_id for b in negative_bags_from_split(ds, torch.tensor([7, 8, 0]))] == ["7", "8"]
    assert len(list(negative_bags_from_split(ds))) == 6
    assert is_negative_bag(make_bag(torch.randn(2, 3), y=[0, 0, 0]))
    assert not is_negative_bag(make_bag(torch.randn(2, 3), y=2))
    with pytest.raises(ValueError, match="'y'"):
        is_negative_bag(Data(x=torch.randn(2, 3)))
