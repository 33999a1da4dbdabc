import json
import os

import numpy as np
import pytest
import torch
from torch_geometric.loader import DataLoader

from graphmil.datasets import ClassicMIL

NAMES = ["musk1", "musk2", "ucsb_breast"]


@pytest.mark.parametrize("name", NAMES)
def test_counts_equal_meta_json(shared_data, name):
    with open(os.path.join(shared_data, name, "meta.json")) as fh:
        stats = json.load(fh)["stats"]
    ds = ClassicMIL(name, root=shared_data)
    sizes = [ds[i].num_nodes for i in range(len(ds))]
    assert len(ds) == stats["n_bags"]
    assert int(ds.labels.sum()) == stats["n_pos_bags"]
    assert sum(sizes) == ds.num_instances == stats["n_instances"]
    assert ds[0].x.shape[1] == stats["dim"]
    assert min(sizes) == stats["bag_size_min"] and max(sizes) == stats["bag_size_max"]
    assert np.isclose(np.mean(sizes), stats["bag_size_mean"])


@pytest.mark.parametrize("name", NAMES)
def test_bags_equal_file_rows(shared_data, name):
    z = np.load(os.path.join(shared_data, name, f"{name}.npz"))
    ds = ClassicMIL(name, root=shared_data)
    for i in (0, len(ds) // 2, len(ds) - 1):
        bag = ds[i]
        rows = z["bag_ids"] == i  # oracle: select rows by bag id
        assert torch.equal(bag.x, torch.from_numpy(z["X"][rows]))
        assert int(bag.y) == int(z["bag_labels"][i]) and bag.y.shape == (1,)
        assert (bag.y_inst == -1).all() and bag.y_inst.numel() == rows.sum()
        assert bag.slide_id == str(z["bag_names"][i]) and bag.bag_index == i
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch.num_graphs == 5 and batch.x.size(0) == sum(ds[i].num_nodes for i in range(5))


def test_musk1_folds(shared_data):
    ds = ClassicMIL("musk1", root=shared_data)
    mask = ds.folds_train_mask
    assert mask.shape == (5, 10, 92) and mask.dtype == torch.bool
    folds = ds.folds()
    assert len(folds) == 50
    assert folds[13].train == torch.nonzero(mask[1, 3]).flatten().tolist()
    assert folds[13].test == torch.nonzero(~mask[1, 3]).flatten().tolist()
    musk2 = ClassicMIL("musk2", root=shared_data)
    assert musk2.folds_train_mask is None
    with pytest.raises(ValueError, match="no fixed folds"):
        musk2.folds()


def test_zscore_from_training_bags_only(shared_data):
    z = np.load(os.path.join(shared_data, "musk1", "musk1.npz"))
    ds = ClassicMIL("musk1", root=shared_data)
    train = list(range(0, 92, 2))
    t = ds.zscore(train)
    rows = np.isin(z["bag_ids"], train)
    x = z["X"][rows].astype(np.float64)
    assert np.allclose(t.mean.numpy(), x.mean(0), atol=1e-4)
    sd = x.std(0)
    assert np.allclose(t.std.numpy(), np.where(sd < 1e-6, 1, sd), rtol=1e-4)
    # statistics ignore the test bags
    assert not np.allclose(t.mean.numpy(), z["X"].mean(0), atol=1e-3)
    sub = ds.index_select(train)
    sub.transform = t
    xt = torch.cat([b.x for b in sub])
    assert torch.allclose(xt.mean(0), torch.zeros(166), atol=1e-3)
    mask = np.zeros(92, dtype=bool)
    mask[train] = True
    assert torch.equal(ds.zscore(mask).mean, t.mean)


def test_errors(tmp_path, monkeypatch, shared_data):
    with pytest.raises(ValueError, match="musk1, musk2, ucsb_breast"):
        ClassicMIL("musk3", root=shared_data)
    with pytest.raises(ValueError, match=str(tmp_path / "musk1" / "musk1.npz")):
        ClassicMIL("musk1", root=str(tmp_path))
    monkeypatch.delenv("GRAPHMIL_DATA", raising=False)
    with pytest.raises(ValueError, match="GRAPHMIL_DATA"):
        ClassicMIL("musk1")
    monkeypatch.setenv("GRAPHMIL_DATA", shared_data)
    assert len(ClassicMIL("musk1")) == 92


def test_errors_without_shared_data(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        ClassicMIL("ucsb_breast", root=str(tmp_path))
    with pytest.raises(ValueError, match="known"):
        ClassicMIL("colon", root=str(tmp_path))
    np.savez(tmp_path / "bad.npz", X=np.zeros((3, 2), np.float32))
    (tmp_path / "musk2").mkdir()
    os.replace(tmp_path / "bad.npz", tmp_path / "musk2" / "musk2.npz")
    with pytest.raises(ValueError, match="lacks the arrays"):
        ClassicMIL("musk2", root=str(tmp_path))
