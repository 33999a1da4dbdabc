import csv
import math
import os

import pytest
import torch
from torch_geometric.loader import DataLoader

from graphmil.datasets.feature_bags import FeatureBagDataset, read_labels
from graphmil.io import read_bag, write_synthetic_folder
from graphmil.transforms import KNNGraph


def snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def oracle_edges(pos, radius):
    p = pos.double()
    d = torch.cdist(p, p)
    adj = (d <= radius) & ~torch.eye(len(p), dtype=torch.bool)
    return set(map(tuple, adj.nonzero().tolist()))


@pytest.fixture
def clam(tmp_path):
    return write_synthetic_folder(tmp_path / "clam", layout="clam_h5", num_slides=4, empty_slide=True)


def test_dataset_bags_labels_and_graph(clam, tmp_path):
    before = snapshot(clam.root)
    with pytest.warns(UserWarning, match="empty slide 'slide_empty'"):
        ds = FeatureBagDataset(clam.root, clam.labels_path, cache_dir=tmp_path / "cache", log=False)
    assert snapshot(clam.root) == before  # nothing written into the source folder
    assert len(ds) == 4 and ds.slide_ids == clam.slide_ids
    assert ds.label_map == {"normal": 0, "tumor": 1} and ds.num_classes == 2
    for i, sid in enumerate(clam.slide_ids):
        bag = ds[i]
        src = read_bag(clam.feature_file(sid))
        assert torch.equal(bag.x, src.x) and torch.equal(bag.pos, src.pos)
        assert bag.y.shape == (1,) and bag.y.item() == ds.label_map[clam.labels[sid]]
        assert bag.case_id == clam.case_ids[sid]
        assert set(map(tuple, bag.edge_index.t().tolist())) == oracle_edges(bag.pos, 1.01 * math.sqrt(2) * 512)
    assert torch.equal(ds.targets, torch.tensor([0, 1, 0, 1]))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch.num_graphs == 4 and batch.y.tolist() == [0, 1, 0, 1]
    assert torch.equal(batch.batch[batch.edge_index[0]], batch.batch[batch.edge_index[1]])


def test_dataset_caches_and_rebuilds_on_parameter_change(clam, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds8 = FeatureBagDataset(clam.root, clam.labels_path, cache_dir=cache, log=False)
    files = sorted(p for p in ds8.cache_dir.iterdir() if p.name.startswith("slide_"))
    assert len(files) == 4
    stamps = {p: p.stat().st_mtime_ns for p in files}

    calls = []
    import graphmil.datasets.feature_bags as fb

    real = fb.read_bag
    monkeypatch.setattr(fb, "read_bag", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = FeatureBagDataset(clam.root, clam.labels_path, cache_dir=cache, log=False)
    assert again.cache_dir == ds8.cache_dir
    assert calls == []  # nothing re-processed
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    ds4 = FeatureBagDataset(clam.root, clam.labels_path, cache_dir=cache, graph="grid4", log=False)
    assert ds4.cache_dir != ds8.cache_dir and len(calls) == 4
    e4 = set(map(tuple, ds4[0].edge_index.t().tolist()))
    assert e4 == oracle_edges(ds4[0].pos, 1.01 * 512)
    assert e4 < set(map(tuple, ds8[0].edge_index.t().tolist()))
    knn = FeatureBagDataset(clam.root, clam.labels_path, cache_dir=cache, graph=KNNGraph(3), log=False)
    assert knn.cache_dir not in (ds4.cache_dir, ds8.cache_dir)

    # a changed source file is re-processed (content-keyed), the stale cache entry removed
    calls.clear()
    sid = clam.slide_ids[0]
    src = clam.feature_file(sid)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ds8b = FeatureBagDataset(clam.root, clam.labels_path, cache_dir=cache, log=False)
    assert [p.name for p in calls] == [src.name]
    assert len(list(ds8b.cache_dir.glob(f"{sid}.*.pt"))) == 1


def test_dataset_label_mismatches(clam, tmp_path):
    rows = list(csv.DictReader(open(clam.labels_path)))
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["case_id", "slide_id", "label"])
        w.writeheader()
        w.writerows([r for r in rows if r["slide_id"] != "slide_002"])
        w.writerow({"case_id": "c9", "slide_id": "slide_ghost", "label": "tumor"})
    with pytest.raises(ValueError, match=r"1 slide\(s\) in .* without a label .*: slide_002.*1 labelled slide\(s\) with no feature file .*: slide_ghost"):
        FeatureBagDataset(clam.root, bad, cache_dir=tmp_path / "c", log=False)
    with pytest.warns(UserWarning, match="slide_ghost"):
        ds = FeatureBagDataset(clam.root, bad, cache_dir=tmp_path / "c", strict=False, log=False)
    assert "slide_002" not in ds.slide_ids and len(ds) == 3
    with pytest.raises(ValueError, match="needs columns 'slide_id' and 'grade'"):
        FeatureBagDataset(clam.root, clam.labels_path, label_column="grade", cache_dir=tmp_path / "c", log=False)


def test_dataset_never_writes_into_root(clam):
    with pytest.raises(ValueError, match="inside the source folder"):
        FeatureBagDataset(clam.root, clam.labels_path, cache_dir=clam.root / "cache", log=False)
    assert not (clam.root / "cache").exists()


def test_trident_tsv_labels_and_default_cache(tmp_path, monkeypatch):
    f = write_synthetic_folder(tmp_path / "trident", layout="trident", num_slides=3, dtype="float16")
    monkeypatch.setenv("GRAPHMIL_CACHE", str(tmp_path / "home_cache"))
    before = snapshot(f.root)
    ds = FeatureBagDataset(f.root, f.labels_path, log=False)
    assert snapshot(f.root) == before
    assert str(ds.cache_dir).startswith(str(tmp_path / "home_cache"))
    assert ds.label_map is None and ds.targets.tolist() == [0, 1, 0]
    assert ds[1].x.dtype == torch.float32 and ds[1].y.dtype == torch.long
    # a mapping with WSI extensions on the slide ids
    labels = {f"{s}.svs": i % 2 for i, s in enumerate(f.slide_ids)}
    assert FeatureBagDataset(f.root, labels, log=False).slide_ids == f.slide_ids


def test_read_labels_formats(tmp_path):
    p = tmp_path / "l.tsv"
    p.write_text("case_id\tslide_id\ttumor\tfold_0\nc1\ts1.svs\t1\ttrain\nc1\ts2.ndpi\t\ttest\n")
    assert read_labels(p, "tumor") == {"s1": ("c1", "1"), "s2": ("c1", None)}
    q = tmp_path / "l.txt"
    q.write_text("slide_id,label\na,x\n")
    assert read_labels(q) == {"a": ("a", "x")}
    with pytest.raises(ValueError, match="labels file not found"):
        read_labels(tmp_path / "none.csv")
