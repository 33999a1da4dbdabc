
import pytest
import torch

from graphmil.train import subset


def test_subset_of_pyg_dataset():
    from graphmil.datasets import SyntheticBags
    ds = SyntheticBags(num_bags=6, num_features=4, seed=0, min_instances=3, max_instances=4)
    sub = subset(ds, [4, 1])
    assert len(sub) == 2 and sub[0].slide_id == ds[4].slide_id


def test_meta_num_classes_and_output_checks(tmp_path):
    from pathlib import Path

    from graphmil import make_bag
    from graphmil.train import check_output_dir, dataset_meta, resolve_num_classes

    bags = [make_bag(torch.randn(3, 4), y=i % 3, slide_id=f"s{i}", case_id=f"c{i // 2}") for i in range(6)]
    meta = dataset_meta(bags)
    assert meta.slide_ids == [f"s{i}" for i in range(6)] and meta.case_ids[:3] == ["c0", "c0", "c1"]
    assert meta.has_case_ids and meta.in_channels == 4 and meta.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert resolve_num_classes(meta, None) == 3 and resolve_num_classes(meta, 4) == 4
    with pytest.raises(ValueError, match="is 1 .* 3 classes"):
        resolve_num_classes(meta, 1)
    binary = dataset_meta(bags[:2])
    assert resolve_num_classes(binary, None) == 1 and resolve_num_classes(binary, 2) == 2
    with pytest.raises(ValueError, match="single class"):
        resolve_num_classes(dataset_meta(bags[:1]), None)
    with pytest.raises(ValueError, match="share the slide id 's0'"):
        dataset_meta([bags[0], bags[0]])
    src = tmp_path / "features"
    src.mkdir()
    check_output_dir(str(tmp_path / "runs" / "x"), [src.resolve()])
    with pytest.raises(ValueError, match="inside the source folder"):
        check_output_dir(str(src / "x"), [Path(src).resolve()])


def test_feature_bag_meta_reads_no_feature_file(tmp_path, monkeypatch):
    """A FeatureBagDataset (and a view of it) answers from its labels table and scan."""
    import graphmil.datasets.feature_bags as fb
    from graphmil.datasets import FeatureBagDataset
    from graphmil.io import write_synthetic_folder
    from graphmil.train import dataset_meta

    f = write_synthetic_folder(str(tmp_path / "feat"), layout="clam_h5", num_slides=4, num_features=6)
    ds = FeatureBagDataset(f.root, f.labels_path, cache_dir=str(tmp_path / "cache"), log=False)

    def no_read(*a, **k):
        raise AssertionError("dataset_meta must not read a bag")

    monkeypatch.setattr(fb, "read_bag", no_read)
    meta = dataset_meta(ds)
    assert meta.slide_ids == ds.slide_ids and meta.in_channels == 6
    assert meta.class_names == ["normal", "tumor"]
    view = dataset_meta(subset(ds, [3, 1]))
    assert view.slide_ids == [ds.slide_ids[3], ds.slide_ids[1]] and view.labels.tolist() == ds.targets[[3, 1]].tolist()
