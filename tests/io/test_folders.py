import h5py
import pytest
import torch

from graphmil.io import BagFileError, detect_layout, scan, write_bag, write_synthetic_folder


@pytest.mark.parametrize("layout", ["trident", "clam_h5", "clam_pt"])
def test_scan_detects_layout_and_counts(tmp_path, layout):
    f = write_synthetic_folder(tmp_path, layout=layout, num_slides=3, num_features=8)
    info = scan(tmp_path)
    assert info.layout == layout
    assert info.feature_dir == f.feature_dir and info.patches_dir == f.patches_dir
    assert info.slide_ids == f.slide_ids
    for s in info:
        if layout == "clam_pt":
            n = torch.load(s.path).shape[0]
        else:
            with h5py.File(s.path, "r") as h:
                n = h["features"].shape[0]
        assert s.num_patches == n and s.num_features == 8
    # root may also be the feature folder itself
    assert scan(f.feature_dir).layout == layout
    assert info.read(f.slide_ids[0]).slide_id == f.slide_ids[0]
    assert "slides:       3" in info.summary()


def test_scan_skips_empty_slides_with_warning(tmp_path):
    write_synthetic_folder(tmp_path, layout="trident", num_slides=2, empty_slide=True)
    with pytest.warns(UserWarning, match="empty slide 'slide_empty'"):
        info = scan(tmp_path)
    assert len(info) == 2 and [s.slide_id for s in info.empty] == ["slide_empty"]


def test_trident_several_encoders(tmp_path):
    write_synthetic_folder(tmp_path, layout="trident", num_slides=1, encoder="uni_v1")
    write_synthetic_folder(tmp_path, layout="trident", num_slides=1, encoder="conch_v15")
    with pytest.raises(ValueError, match="several TRIDENT feature folders"):
        scan(tmp_path)
    assert scan(tmp_path, encoder="conch_v15").encoder == "conch_v15"
    with pytest.raises(ValueError, match="features_gigapath"):
        scan(tmp_path, encoder="gigapath")


def test_graphmil_layout_and_unknown(tmp_path):
    f = write_synthetic_folder(tmp_path / "src", layout="clam_h5", num_slides=2)
    out = tmp_path / "bags"
    info = scan(f.root)
    for s in info:
        write_bag(out / f"{s.slide_id}.pt", info.read(s.slide_id))
    g = scan(out)
    assert g.layout == "graphmil" and g.slide_ids == f.slide_ids
    assert [s.num_patches for s in g] == [s.num_patches for s in info]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no CLAM .* layout found"):
        detect_layout(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not a folder"):
        scan(tmp_path / "missing")


def test_scan_unreadable_file(tmp_path):
    f = write_synthetic_folder(tmp_path, layout="clam_h5", num_slides=2)
    (f.feature_dir / "broken.h5").write_bytes(b"garbage")
    with pytest.raises(BagFileError, match=r"broken\.h5: unreadable file"):
        scan(tmp_path)
    with pytest.warns(UserWarning, match="broken"):
        info = scan(tmp_path, on_error="warn")
    assert len(info) == 2 and len(info.errors) == 1
