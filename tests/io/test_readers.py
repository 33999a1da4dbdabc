import h5py
import numpy as np
import pytest
import torch

from graphmil.io import BagFileError, EmptySlideError, read_bag, write_synthetic_folder


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def test_trident_reader_matches_h5py_and_upcasts_fp16(tmp_path):
    f = write_synthetic_folder(tmp_path, layout="trident", num_slides=2, dtype="float16", overlap=32)
    path = f.feature_file(f.slide_ids[1])
    bag = read_bag(path)
    with h5py.File(path, "r") as h:
        feats, coords = h["features"][:], h["coords"][:]
        assert feats.dtype == np.float16
    assert bag.x.dtype == torch.float32 and bag.pos.dtype == torch.int64
    np.testing.assert_array_equal(bag.x.numpy(), feats.astype(np.float32))
    np.testing.assert_array_equal(bag.pos.numpy(), coords)  # level-0 px, untouched
    assert bag.slide_id == f.slide_ids[1]
    assert bag.source_format == "trident" and bag.encoder == "uni_v1"
    assert bag.patch_size == 256 and bag.patch_size_level0 == 512 and bag.overlap == 32
    assert bag.level0_magnification == 40 and bag.target_magnification == 20
    assert bag.step_level0 == pytest.approx(512 - 32 * 40 / 20)


def test_clam_h5_reader_uses_patches_attrs(tmp_path):
    f = write_synthetic_folder(tmp_path, layout="clam_h5", num_slides=1)
    bag = read_bag(f.feature_file(f.slide_ids[0]))
    with h5py.File(f.feature_file(f.slide_ids[0]), "r") as h:
        np.testing.assert_array_equal(bag.x.numpy(), h["features"][:])
        np.testing.assert_array_equal(bag.pos.numpy(), h["coords"][:].astype(np.int64))
    # patch_size 256 at level 1 with downsample 2 -> 512 level-0 px
    assert bag.source_format == "clam_h5" and bag.patch_level == 1
    assert bag.patch_size_level0 == 512 and bag.step_level0 == 512


def test_clam_h5_without_patches_infers_step(tmp_path):
    f = write_synthetic_folder(tmp_path, layout="clam_h5", num_slides=1)
    for p in f.patches_dir.iterdir():
        p.unlink()
    bag = read_bag(f.feature_file(f.slide_ids[0]))
    assert bag.step_level0 == 512 and bag.patch_size_level0 == 512 and bag.patch_size == -1


def test_clam_pt_reader_takes_coords_from_patches(tmp_path):
    f = write_synthetic_folder(tmp_path, layout="clam_pt", num_slides=1)
    sid = f.slide_ids[0]
    bag = read_bag(f.feature_file(sid))
    with h5py.File(f.patches_dir / f"{sid}.h5", "r") as h:
        np.testing.assert_array_equal(bag.pos.numpy(), h["coords"][:])
    torch.testing.assert_close(bag.x, torch.load(f.feature_file(sid)))
    assert bag.source_format == "clam_pt" and bag.patch_size_level0 == 512
    # patches_dir argument: move the coordinates elsewhere
    other = tmp_path / "elsewhere"
    f.patches_dir.rename(other)
    with pytest.raises(BagFileError, match="missing coordinates"):
        read_bag(f.feature_file(sid))
    assert torch.equal(read_bag(f.feature_file(sid), patches_dir=other).pos, bag.pos)


def test_empty_slide(tmp_path):
    f = write_synthetic_folder(tmp_path, layout="trident", num_slides=1, empty_slide=True)
    with pytest.raises(EmptySlideError, match="slide_empty.h5: empty slide"):
        read_bag(f.feature_file("slide_empty"))
    assert issubclass(EmptySlideError, ValueError)


def test_row_count_mismatch(tmp_path):
    p = _h5(tmp_path / "a.h5", features=np.zeros((3, 4), np.float32), coords=np.array([[0, 0], [1, 0]]))
    with pytest.raises(BagFileError, match=r"a\.h5: row-count mismatch: 'features' has 3 rows but 'coords' has 2"):
        read_bag(p)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_features(tmp_path, bad):
    x = np.zeros((3, 4), np.float32)
    x[2, 1] = bad
    p = _h5(tmp_path / "b.h5", features=x, coords=np.array([[0, 0], [1, 0], [2, 0]]))
    with pytest.raises(BagFileError, match=r"b\.h5: NaN/Inf features in 1 row\(s\) \(first rows: \[2\]\)"):
        read_bag(p)


def test_missing_datasets(tmp_path):
    p = _h5(tmp_path / "c.h5", coords=np.array([[0, 0]]))
    with pytest.raises(BagFileError, match=r"c\.h5: missing dataset 'features'"):
        read_bag(p)
    p = _h5(tmp_path / "d.h5", feats=np.zeros((2, 2)))
    with pytest.raises(BagFileError, match=r"d\.h5: missing dataset 'features' \(datasets present: \['feats'\]\)"):
        read_bag(p)
    p = _h5(tmp_path / "e.h5", features=np.zeros((2, 2), np.float32))
    with pytest.raises(BagFileError, match=r"e\.h5: missing dataset 'coords'"):
        read_bag(p)


def test_duplicate_coordinates(tmp_path):
    p = _h5(tmp_path / "f.h5", features=np.zeros((3, 2), np.float32), coords=np.array([[0, 0], [512, 0], [0, 0]]))
    with pytest.raises(BagFileError, match=r"f\.h5: duplicate coordinates: 1 repeated row\(s\), e\.g\. rows \[0, 2\]"):
        read_bag(p)


def test_unreadable_files(tmp_path):
    p = tmp_path / "g.h5"
    p.write_bytes(b"not an hdf5 file")
    with pytest.raises(BagFileError, match=r"g\.h5: unreadable file"):
        read_bag(p)
    q = tmp_path / "h.pt"
    q.write_bytes(b"garbage")
    with pytest.raises(BagFileError, match=r"h\.pt: unreadable file"):
        read_bag(q)
    with pytest.raises(BagFileError, match="no such file"):
        read_bag(tmp_path / "missing.h5")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(BagFileError, match=r"x\.txt: unsupported file type '\.txt'"):
        read_bag(tmp_path / "x.txt")
    with pytest.raises(BagFileError, match="is a directory"):
        read_bag(tmp_path)


def test_bad_shapes_and_coords(tmp_path):
    p = _h5(tmp_path / "i.h5", features=np.zeros((2, 2), np.float32), coords=np.array([[0.5, 0], [1, 0]]))
    with pytest.raises(BagFileError, match="non-integer"):
        read_bag(p)
    p = _h5(tmp_path / "j.h5", features=np.zeros((2,), np.float32), coords=np.array([[0, 0], [1, 0]]))
    with pytest.raises(BagFileError, match=r"'features' must have shape \(N, D\)"):
        read_bag(p)


def test_step_attribute_disagreeing_with_coords_trusts_coords(tmp_path):
    # TRIDENT attributes claim 256 px at level 0 (the 20x patch size), coordinates are 512 apart
    coords = np.array([[i * 512 + 7, j * 512 + 3] for i in range(4) for j in range(3)], dtype=np.int64)
    p = tmp_path / "features_uni_v1" / "s.h5"
    p.parent.mkdir()
    with h5py.File(p, "w") as f:
        f.create_dataset("features", data=np.ones((12, 4), np.float16))
        ds = f.create_dataset("coords", data=coords)
        ds.attrs.update({"patch_size": 256, "patch_size_level0": 256, "level0_magnification": 40,
                         "target_magnification": 20, "overlap": 0})
    with pytest.warns(UserWarning, match=r"s\.h5: grid step from the attributes \(256 level-0 px\) disagrees .* \(512\)"):
        bag = read_bag(p)
    assert bag.step_level0 == 512 and bag.patch_size_level0 == 256  # attribute kept, step corrected
    np.testing.assert_array_equal(bag.pos.numpy(), coords)


def test_single_patch_slide_keeps_attribute_step(tmp_path):
    p = _h5(tmp_path / "one.h5", features=np.ones((1, 3), np.float32), coords=np.array([[100, 200]]))
    bag = read_bag(p)
    assert bag.num_nodes == 1 and bag.step_level0 == -1 and bag.source_format == "clam_h5"
