import json
import os

import numpy as np
import pytest
import torch

from graphmil.datasets import ColonCancerBags
from graphmil.datasets import colon as colon_mod
from graphmil.datasets.colon import HANDCRAFTED_FEATURES, RUIFROK_HED, encode_patches

_ROOT = os.path.abspath(os.environ.get(
    "GRAPHMIL_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")))


@pytest.fixture(scope="module")
def root():
    if not os.path.isfile(os.path.join(_ROOT, "colon_cancer", "bags_27px.npz")):
        pytest.skip(f"colon_cancer data not found under {_ROOT} (set GRAPHMIL_DATA)")
    return _ROOT


@pytest.fixture(scope="module")
def raw_npz(root):
    z = np.load(os.path.join(root, "colon_cancer", "bags_27px.npz"))
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("colon_cache"))


@pytest.fixture(scope="module")
def hand(root, cache_dir):
    return ColonCancerBags(root=root, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def raw(root):
    return ColonCancerBags(root=root, features="raw", graph="knn", k=4)


def test_counts_and_bag_labels(hand, root):
    with open(os.path.join(root, "colon_cancer", "meta.json")) as fh:
        stats = json.load(fh)["stats"]
    sizes = [hand[i].num_nodes for i in range(len(hand))]
    assert len(hand) == 100 == stats["n_bags"]
    assert sum(sizes) == 22444 == stats["n_instances"]
    assert int(hand.labels.sum()) == 51 == stats["n_pos_bags"]
    assert (min(sizes), max(sizes)) == (1, 796)
    n_pos_inst = 0
    for i in range(len(hand)):
        bag = hand[i]
        assert int(bag.y) == int((bag.y_inst == 1).any())  # bag label = any(epithelial)
        assert torch.equal(bag.y_inst, (bag.instance_class == 1).long())
        n_pos_inst += int(bag.y_inst.sum())
        assert bag.slide_id == f"img{i + 1}" and bag.image_index == i
    assert n_pos_inst == 7722 == stats["n_pos_instances"]


def test_positions_and_raw_pixels(raw, raw_npz):
    ptr = np.concatenate([[0], np.cumsum(np.bincount(raw_npz["bag_ids"]))])
    for i in (0, 37, 99):
        bag = raw[i]
        a, b = ptr[i], ptr[i + 1]
        assert bag.pos.dtype == torch.float32
        assert torch.equal(bag.pos, torch.from_numpy(raw_npz["coords_xy"][a:b]))
        assert bag.x.shape == (b - a, 3 * 27 * 27)
        img = (bag.x.view(-1, 3, 27, 27) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        assert torch.equal(img, torch.from_numpy(raw_npz["patches"][a:b]))


def test_image_matches_patches(raw, raw_npz):
    img = raw.image(5)
    assert img.shape == (500, 500, 3) and img.dtype == np.uint8
    bag = raw[5]
    patches = (bag.x.view(-1, 3, 27, 27) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    checked = 0
    for j, (x, y) in enumerate(bag.pos.numpy()):
        r, c = int(np.floor(y)), int(np.floor(x))
        if 13 <= r < 500 - 14 and 13 <= c < 500 - 14:  # documented crop for interior nuclei
            assert np.array_equal(img[r - 13:r + 14, c - 13:c + 14], patches[j])
            checked += 1
    assert checked > 10
    with pytest.raises(ValueError, match="out of range"):
        raw.image(100)


def test_radius_graph_equals_bruteforce(hand):
    for i in (0, 12, 64):
        bag = hand[i]
        p = bag.pos.double()
        d = torch.cdist(p, p)
        oracle = (d <= 25.0) & ~torch.eye(len(p), dtype=torch.bool)
        got = torch.zeros_like(oracle)
        got[bag.edge_index[0], bag.edge_index[1]] = True
        assert torch.equal(got, oracle)


def test_knn_graph_symmetric_and_contains_nearest(raw):
    for i in (3, 50):
        bag = raw[i]
        n = bag.num_nodes
        adj = torch.zeros(n, n, dtype=torch.bool)
        adj[bag.edge_index[0], bag.edge_index[1]] = True
        assert torch.equal(adj, adj.t()) and not adj.diagonal().any()
        d = torch.cdist(bag.pos.double(), bag.pos.double()) + torch.eye(n) * 1e9
        nearest = d.topk(4, largest=False).indices
        assert adj.gather(1, nearest).all()
        # nothing beyond the union of k-NN relations
        knn = torch.zeros(n, n, dtype=torch.bool)
        knn.scatter_(1, nearest, True)
        assert torch.equal(adj, knn | knn.t())


def test_handcrafted_encoding(hand, raw_npz):
    x = torch.cat([hand[i].x for i in range(3)])
    assert x.shape[1] == len(HANDCRAFTED_FEATURES) == 44 and torch.isfinite(x).all()
    p = raw_npz["patches"][:40]
    full = encode_patches(p)
    assert np.array_equal(full, encode_patches(p))  # deterministic
    assert np.allclose(full, x[:40].numpy(), atol=1e-5)  # the dataset's columns (encoded in chunks)
    # chunking / vectorisation equals one patch at a time
    single = np.concatenate([encode_patches(p[j:j + 1]) for j in range(0, 40, 7)])
    assert np.allclose(single, full[::7], atol=1e-5)
    # spot-check columns against direct per-patch formulas
    q = p.astype(np.float64) / 255
    col = HANDCRAFTED_FEATURES.index
    assert np.allclose(full[:, col("rgb_mean_G")], q[..., 1].mean((1, 2)), atol=1e-5)
    grey = q @ np.array([0.299, 0.587, 0.114])
    assert np.allclose(full[:, col("grey_hist_3")], ((grey >= 3 / 8) & (grey < 4 / 8)).mean((1, 2)), atol=1e-6)
    od = -np.log10((p.astype(np.float64) + 1) / 256)
    h = od @ np.linalg.inv(RUIFROK_HED)[:, 0]
    assert np.allclose(full[:, col("H_mean")], h.mean((1, 2)), atol=1e-4)


def test_ruifrok_deconvolution_recovers_pure_stains():
    # a patch whose optical density is exactly 0.8 x haematoxylin: H = 0.8, E = 0
    od = 0.8 * RUIFROK_HED[0]
    rgb = np.clip(np.round(256 * 10 ** (-od) - 1), 0, 255).astype(np.uint8)
    f = encode_patches(np.broadcast_to(rgb, (1, 27, 27, 3)).copy())[0]
    assert abs(f[HANDCRAFTED_FEATURES.index("H_mean")] - 0.8) < 0.02
    assert abs(f[HANDCRAFTED_FEATURES.index("E_mean")]) < 0.02
    with pytest.raises(ValueError, match="patches"):
        encode_patches(np.zeros((2, 27, 27), np.uint8))


def test_handcrafted_features_separate_epithelial_nuclei(hand):
    """A linear discriminant (closed form, numpy) on z-scored features, trained on 80 images,
    ranks epithelial nuclei of the 20 held-out images well above chance."""
    from sklearn.metrics import roc_auc_score

    train = [i for i in range(100) if i % 5]
    test = [i for i in range(100) if i % 5 == 0]
    zs = hand.zscore(train)
    bags = [zs(hand[i]) for i in range(100)]
    xtr = torch.cat([bags[i].x for i in train]).double().numpy()
    ytr = torch.cat([bags[i].y_inst for i in train]).numpy()
    xte = torch.cat([bags[i].x for i in test]).double().numpy()
    yte = torch.cat([bags[i].y_inst for i in test]).numpy()
    mu1, mu0 = xtr[ytr == 1].mean(0), xtr[ytr == 0].mean(0)
    cov = np.cov(xtr.T) + 1e-3 * np.eye(xtr.shape[1])
    w = np.linalg.solve(cov, mu1 - mu0)
    assert roc_auc_score(yte, xte @ w) > 0.85


def test_cache_is_reused(root, cache_dir, hand, monkeypatch):
    files = os.listdir(cache_dir)
    assert len(files) == 1 and files[0].endswith(".npy")

    def boom(*a, **k):
        raise AssertionError("encoder called although the cache exists")

    monkeypatch.setattr(colon_mod, "encode_patches", boom)
    again = ColonCancerBags(root=root, cache_dir=cache_dir, graph=None)
    assert torch.equal(again[7].x, hand[7].x)
    assert again[7].edge_index.shape == (2, 0)
    with pytest.raises(ValueError, match="inside the data folder"):
        ColonCancerBags(root=root, cache_dir=os.path.join(root, "colon_cancer", "cache"))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="features"):
        ColonCancerBags(root=str(tmp_path), features="cnn")
    with pytest.raises(ValueError, match="graph"):
        ColonCancerBags(root=str(tmp_path), graph="delaunay")
    with pytest.raises(ValueError, match="bags_27px.npz"):
        ColonCancerBags(root=str(tmp_path))
