import h5py
import numpy as np
import pytest
import torch

from graphmil import make_bag
from graphmil.io import read_bag, write_bag, write_scores, write_synthetic_folder
from graphmil.transforms import GridGraph


def test_write_bag_round_trip(tmp_path):
    f = write_synthetic_folder(tmp_path / "src", layout="trident", num_slides=1)
    bag = GridGraph()(read_bag(f.feature_file(f.slide_ids[0])))
    bag.y = torch.tensor([1])
    bag.y_inst = torch.randint(-1, 2, (bag.num_nodes,))
    out = write_bag(tmp_path / "cache" / "bag.pt", bag)
    back = read_bag(out)
    assert set(back.keys()) == set(bag.keys())
    for k in bag.keys():
        if isinstance(bag[k], torch.Tensor):
            assert back[k].dtype == bag[k].dtype and torch.equal(back[k], bag[k]), k
        else:
            assert back[k] == bag[k] and type(back[k]) is type(bag[k]), k
    # a plain dict of tensors, loadable without graphmil's classes
    raw = torch.load(out, weights_only=True)
    assert raw["format"] == "graphmil-bag" and torch.equal(raw["tensors"]["x"], bag.x)


def test_write_bag_rejects_unstorable(tmp_path):
    bag = make_bag(torch.randn(2, 3), meta=object())
    with pytest.raises(ValueError, match="attribute 'meta'"):
        write_bag(tmp_path / "x.pt", bag)


def test_write_scores_read_back_with_h5py(tmp_path):
    f = write_synthetic_folder(tmp_path / "src", layout="trident", num_slides=1, overlap=32)
    bag = read_bag(f.feature_file(f.slide_ids[0]))
    n = bag.num_nodes
    att, prob = torch.rand(n), np.random.rand(n, 2)
    out = write_scores(tmp_path / "out" / "s.h5", bag, attention=att, prob=prob)
    with h5py.File(out, "r") as h:
        np.testing.assert_array_equal(h["coords"][:], bag.pos.numpy())
        assert h["coords"].dtype == np.int64
        np.testing.assert_allclose(h["attention"][:], att.numpy())
        np.testing.assert_allclose(h["prob"][:], prob.astype(np.float32))
        a = h["coords"].attrs
        assert a["patch_size_level0"] == 512 and a["overlap"] == 32 and a["level0_magnification"] == 40
        assert a["slide_id"] == f.slide_ids[0] and h.attrs["encoder"] == "uni_v1"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_scores(out, bag, attention=att)
    write_scores(out, bag, overwrite=True, attention=1 - att)
    with h5py.File(out, "r") as h:
        np.testing.assert_allclose(h["attention"][:], (1 - att).numpy())


def test_write_scores_refuses_source_folders(tmp_path):
    f = write_synthetic_folder(tmp_path / "src", layout="clam_h5", num_slides=1)
    bag = read_bag(f.feature_file(f.slide_ids[0]))
    a = torch.rand(bag.num_nodes)
    with pytest.raises(ValueError, match="never writes into source folders"):
        write_scores(f.feature_dir / "scores.h5", bag, attention=a)
    with pytest.raises(ValueError, match="never writes into source folders"):
        write_scores(f.patches_dir / "sub" / "scores.h5", bag, attention=a)
    with pytest.raises(ValueError, match="inside the source folder"):
        write_scores(tmp_path / "src" / "scores.h5", bag, source_dir=tmp_path / "src", attention=a)
    assert not (tmp_path / "src" / "scores.h5").exists()


def test_write_scores_bad_scores(tmp_path):
    bag = make_bag(torch.randn(4, 2), pos=torch.arange(8).view(4, 2))
    with pytest.raises(ValueError, match="score 'a' must be"):
        write_scores(tmp_path / "s.h5", bag, a=torch.rand(3))
    with pytest.raises(ValueError, match="score 'a' has NaN"):
        write_scores(tmp_path / "s.h5", bag, a=torch.tensor([0.0, float("nan"), 0, 0]))
    with pytest.raises(ValueError, match="at least one score"):
        write_scores(tmp_path / "s.h5", bag)
    with pytest.raises(ValueError, match="no 'pos'"):
        write_scores(tmp_path / "s.h5", make_bag(torch.randn(2, 2)), a=torch.rand(2))
