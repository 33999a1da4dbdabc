"""QuPath GeoJSON export: valid closed counter-clockwise tile squares in level-0 px (one per patch,
checked against the coordinates read straight from the TRIDENT h5 files), scores that round-trip
by coordinates, merged regions equal to the shapely union of the tiles above the threshold (and as
many pieces as 4-connected components), tile selection vs numpy, and the ``graphmil export``
command (``--checkpoint`` and ``--run``: each slide scored by the fold that held it out)."""

import csv
import json
import os
import uuid

import h5py
import numpy as np
import pytest
import torch

from graphmil.cli import main
from graphmil.io.geojson import (export_prediction, merged_regions, region_features, select_tiles, tile_size,
                                 tile_values, tiles_geojson, write_geojson, write_tiles_csv)
from graphmil.train.inference import BagPrediction

shapely = pytest.importorskip("shapely")
from shapely.geometry import box, shape  # noqa: E402
from shapely.geometry.polygon import orient  # noqa: E402
from shapely.ops import unary_union  # noqa: E402


def shoelace(ring):
    """Signed area of a closed ring, by hand (positive = counter-clockwise on raw coordinates)."""
    r = np.asarray(ring, dtype=np.float64)
    x, y = r[:, 0], r[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def record(pos, scores, ps=256, attention=None, slide_id="s1", probs=(0.2, 0.8), label=1, y_inst=None):
    pos = np.asarray(pos, dtype=np.int64)
    return BagPrediction(index=0, slide_id=slide_id, case_id=slide_id, label=label,
                         logits=np.zeros(1, np.float32), probabilities=np.asarray(probs, dtype=np.float64),
                         pos=pos, instance_scores=np.asarray(scores, dtype=np.float32), attention=attention,
                         y_inst=y_inst, meta={} if ps is None else {"patch_size_level0": ps})


def lattice(nx, ny, step=256, origin=(1000, 2000)):
    g = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), indexing="xy"), -1).reshape(-1, 2)
    return g * step + np.asarray(origin), g


# ------------------------------------------------------------------------------------------------
# a fixture slide: a TRIDENT folder (40x scan patched at 20x: patch_size_level0 = 512)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trident(tmp_path_factory):
    from graphmil.datasets import FeatureBagDataset
    from graphmil.io import write_synthetic_folder
    from graphmil.models import create_model
    from graphmil.train.checkpoint import save_checkpoint
    from graphmil.train.inference import predict

    root = tmp_path_factory.mktemp("geo")
    os.environ.setdefault("GRAPHMIL_CACHE", str(root / "cache"))
    folder = write_synthetic_folder(root / "feat", layout="trident", num_slides=4, num_features=8,
                                    num_contours=2, seed=1)
    ds = FeatureBagDataset(str(folder.root), str(folder.labels_path), cache_dir=str(root / "cache"))
    torch.manual_seed(0)
    model = create_model("acmil", 8, 1, embed_dim=8, hidden_channels=4, branches=2)
    ckpt = save_checkpoint(str(root / "ck.pt"), model, model_spec=model.spec())
    records = list(predict(model, ds))
    return folder, ds, records, ckpt, root


def h5_coords(folder, sid):
    """The coordinates as TRIDENT wrote them, read without graphmil."""
    with h5py.File(folder.feature_file(sid), "r") as f:
        return f["coords"][:], dict(f["coords"].attrs)


def test_fixture_slide_geojson_is_valid_qupath_layout(trident):
    folder, _, records, _, _ = trident
    for rec in records:
        coords, attrs = h5_coords(folder, rec.slide_id)
        ps = int(attrs["patch_size_level0"])
        assert ps == folder.patch_size_level0 == 512
        fc = tiles_geojson(rec, class_names=["normal", "tumor"], model_name="abmil")
        fc = json.loads(json.dumps(fc, allow_nan=False))  # what a file holds
        assert fc["type"] == "FeatureCollection"
        feats = fc["features"]
        assert len(feats) == coords.shape[0]  # one feature per patch
        seen = set()
        for f in feats:
            assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
            uuid.UUID(f["id"])  # QuPath reads the id as a UUID
            props = f["properties"]
            assert props["objectType"] == "tile" and "classification" not in props
            assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in props["measurements"].values())
            assert props["metadata"]["model"] == "abmil"
            rings = f["geometry"]["coordinates"]
            assert len(rings) == 1
            ring = rings[0]
            assert len(ring) == 5 and ring[0] == ring[-1]  # closed
            assert shoelace(ring) == pytest.approx(ps * ps)  # counter-clockwise, the patch's area
            poly = shape(f["geometry"])
            assert poly.is_valid
            assert list(orient(poly, sign=1.0).exterior.coords) == [tuple(p) for p in ring]
            x0, y0, x1, y1 = poly.bounds
            assert (x1 - x0, y1 - y0) == (ps, ps)
            seen.add((int(x0), int(y0)))
        assert seen == {tuple(c) for c in coords.tolist()}  # level-0 top-left corners, untouched
        p = fc["properties"]
        assert p["slide_id"] == rec.slide_id and p["model"] == "abmil" and p["patch_size_level0"] == ps
        assert p["probabilities"]["tumor"] == pytest.approx(float(rec.probabilities[1]))


def test_scores_round_trip_by_coordinates(trident, tmp_path):
    folder, _, records, _, _ = trident
    rec = records[1]
    coords, _ = h5_coords(folder, rec.slide_id)
    path = write_geojson(tmp_path / "out" / f"{rec.slide_id}.geojson",
                         tiles_geojson(rec, class_names=["normal", "tumor"], model_name="abmil"))
    with open(path) as f:
        fc = json.load(f)
    by_xy = {}
    for feat in fc["features"]:
        x0, y0, _, _ = shape(feat["geometry"]).bounds
        by_xy[(int(x0), int(y0))] = feat["properties"]["measurements"]
    att = rec.attention  # [n, 2]: two heads
    assert att.ndim == 2 and att.shape[1] == 2
    for i, (x, y) in enumerate(coords.tolist()):
        m = by_xy[(x, y)]
        assert m["tile_index"] == i
        assert m["score"] == pytest.approx(float(rec.instance_scores[i].mean()), rel=1e-6)
        assert m["attention_0"] == pytest.approx(float(att[i, 0]), rel=1e-6)
        assert m["attention_1"] == pytest.approx(float(att[i, 1]), rel=1e-6)
        assert m["attention"] == pytest.approx(float(att[i].mean()), rel=1e-6)
        assert m["attention_x_n"] == pytest.approx(float(att[i].mean()) * len(coords), rel=1e-4)
        assert m["slide_prob_tumor"] == pytest.approx(float(rec.probabilities[1]))
        assert m["slide_prediction"] == rec.prediction()


def test_overlapping_patches_and_patch_size_override():
    pos, _ = lattice(3, 2, step=128)  # step < patch size: overlapping squares
    rec = record(pos, np.arange(6.0), ps=256)
    fc = tiles_geojson(rec)
    boxes = [shape(f["geometry"]) for f in fc["features"]]
    assert len(boxes) == 6 and all(b.area == 256 * 256 for b in boxes)
    assert boxes[0].intersection(boxes[1]).area == 128 * 256
    fc = tiles_geojson(rec, patch_size=100)
    assert all(shape(f["geometry"]).area == 100 * 100 for f in fc["features"])
    with pytest.raises(ValueError, match="slide 'nosize': the tile size is unknown"):
        tiles_geojson(record(pos, np.arange(6.0), ps=None, slide_id="nosize"))
    assert tile_size(record(pos, np.arange(6.0), ps=None), patch_size=64) == 64
    bad = record(pos, np.arange(6.0), slide_id="nopos")
    bad.pos = None
    with pytest.raises(ValueError, match="slide 'nopos' has no positions"):
        tiles_geojson(bad)


def test_select_tiles_top_k_and_threshold_against_numpy():
    rng = np.random.default_rng(0)
    pos, _ = lattice(6, 5)
    s = rng.normal(size=30).round(1)  # ties on purpose
    rec = record(pos, s)
    keep = select_tiles(rec, threshold=0.3)
    np.testing.assert_array_equal(keep, np.flatnonzero(s.astype(np.float32) >= np.float32(0.3)))
    top = select_tiles(rec, top_k=7)
    ref = sorted(range(30), key=lambda i: (-float(np.float32(s[i])), i))[:7]
    np.testing.assert_array_equal(top, ref)
    both = select_tiles(rec, top_k=3, threshold=0.3)
    assert set(both) <= set(keep) and len(both) == min(3, len(keep))
    fc = tiles_geojson(rec, top_k=4, threshold=0.0, class_names=["normal", "tumor"])
    assert len(fc["features"]) == 4
    assert all(f["properties"]["classification"]["name"] == "tumor" for f in fc["features"])
    with pytest.raises(ValueError, match="top_k"):
        select_tiles(rec, top_k=0)
    with pytest.raises(ValueError, match="no attention"):
        tile_values(rec, "attention")


def components_4(grid_mask):
    from scipy import ndimage

    _, n = ndimage.label(grid_mask, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    return n


@pytest.mark.parametrize("step", [256, 192])
def test_merged_regions_equal_the_union_of_the_tiles_above_threshold(step):
    rng = np.random.default_rng(3)
    pos, g = lattice(9, 7, step=step)
    s = rng.uniform(size=len(pos))
    s[(g[:, 0] >= 2) & (g[:, 0] <= 4) & (g[:, 1] >= 1) & (g[:, 1] <= 3)] = 0.95  # a 3x3 block ...
    s[(g[:, 0] == 3) & (g[:, 1] == 2)] = 0.05  # ... with a hole
    s[(g[:, 0] == 7) & (g[:, 1] == 5)] = 0.99  # corner-touching pair
    s[(g[:, 0] == 8) & (g[:, 1] == 6)] = 0.99
    t = 0.7
    rec = record(pos, s)
    geom = merged_regions(rec, t)
    above = s.astype(np.float32) >= np.float32(t)
    oracle = unary_union([box(x, y, x + 256, y + 256) for x, y in pos[above]])
    assert geom.symmetric_difference(oracle).area == 0
    assert geom.area == pytest.approx(oracle.area)
    fc = tiles_geojson(rec, threshold=t, merge=True, class_names=["normal", "tumor"], model_name="m")
    regions = [f for f in fc["features"] if f["properties"]["objectType"] == "annotation"]
    tiles = [f for f in fc["features"] if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == int(above.sum())
    back = unary_union([shape(f["geometry"]) for f in regions])
    assert back.symmetric_difference(oracle).area == 0
    for f in regions:
        rings = f["geometry"]["coordinates"]
        assert all(r[0] == r[-1] for r in rings)
        assert shoelace(rings[0]) > 0 and all(shoelace(r) < 0 for r in rings[1:])  # holes clockwise
        assert shape(f["geometry"]).is_valid
        assert f["properties"]["classification"]["name"] == "tumor"
        assert f["properties"]["measurements"]["area_px"] == pytest.approx(shape(f["geometry"]).area)
    if step == 256:  # edge-adjacent grid tiles: pieces = 4-connected components of the mask
        mask = np.zeros((7, 9), bool)
        mask[g[above, 1], g[above, 0]] = True
        assert len(regions) == components_4(mask)
        assert sum(len(f["geometry"]["coordinates"]) - 1 for f in regions) >= 1  # the hole is kept
        assert sum(f["properties"]["measurements"]["num_tiles"] for f in regions) == int(above.sum())
    with pytest.raises(ValueError, match="needs a threshold"):
        tiles_geojson(rec, merge=True)
    assert merged_regions(rec, 2.0).is_empty and region_features(merged_regions(rec, 2.0)) == []


def test_writers_refuse_source_folders_existing_files_and_nan(tmp_path):
    pos, _ = lattice(2, 2)
    rec = record(pos, [0.1, float("nan"), 0.3, 0.4])
    fc = tiles_geojson(rec)
    assert "score" not in fc["features"][1]["properties"]["measurements"]  # NaN is never written
    p = write_geojson(tmp_path / "a.geojson", fc)
    with pytest.raises(FileExistsError):
        write_geojson(p, fc)
    for bad in (tmp_path / "features_uni" / "a.geojson", tmp_path / "20x_256px_0px_overlap" / "a.geojson"):
        with pytest.raises(ValueError, match="never writes into source folders"):
            write_geojson(bad, fc)
    with pytest.raises(ValueError, match="never writes into source folders"):
        write_geojson(tmp_path / "src" / "x.geojson", fc, source_dir=tmp_path / "src")
    with pytest.raises(ValueError, match="FeatureCollection"):
        write_geojson(tmp_path / "b.geojson", {"type": "Feature"})
    c = write_tiles_csv(tmp_path / "a.csv", rec, keep=[3, 0])
    with open(c, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [tuple(pos[3]), tuple(pos[0])]
    assert float(rows[0]["score"]) == pytest.approx(0.4) and rows[0]["patch_size_level0"] == "256"
    with pytest.raises(ValueError, match="GeoJSON only"):
        export_prediction(rec, tmp_path / "x", format="csv", threshold=0.2, merge=True)


# ------------------------------------------------------------------------------------------------
# graphmil export
# ------------------------------------------------------------------------------------------------
def tree(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def test_cli_export_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "QuPath" in out and "--merge" in out


def test_cli_export_checkpoint_geojson_csv_h5(trident, capsys):
    folder, _, records, ckpt, root = trident
    before = tree(folder.root)
    base = ["export", "--checkpoint", ckpt, "--folder", str(folder.root), "--labels", str(folder.labels_path)]
    out = root / "exp"
    assert main(base + ["--out", str(out), "--threshold=-1e9", "--merge"]) == 0
    assert sorted(os.listdir(out)) == sorted(f"{s}.geojson" for s in folder.slide_ids)
    for rec in records:
        with open(out / f"{rec.slide_id}.geojson") as f:
            fc = json.load(f)
        tiles = [f for f in fc["features"] if f["properties"]["objectType"] == "tile"]
        coords, _ = h5_coords(folder, rec.slide_id)
        assert len(tiles) == len(coords)
        assert tiles[0]["properties"]["metadata"]["model"] == "acmil"
        assert fc["properties"]["label"] == str(folder.labels[rec.slide_id])  # the labels table's own name
        regions = [f for f in fc["features"] if f["properties"]["objectType"] == "annotation"]
        union = unary_union([box(x, y, x + 512, y + 512) for x, y in coords])
        assert unary_union([shape(f["geometry"]) for f in regions]).symmetric_difference(union).area == 0
    assert main(base + ["--out", str(root / "csv"), "--format", "csv", "--top-k", "3"]) == 0
    with open(root / "csv" / f"{records[0].slide_id}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    s = records[0].score()
    assert [float(r["score"]) for r in rows] == pytest.approx(sorted(s, reverse=True)[:3], rel=1e-6)
    assert main(base + ["--out", str(root / "h5"), "--format", "h5"]) == 0
    with h5py.File(root / "h5" / f"{records[0].slide_id}.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], h5_coords(folder, records[0].slide_id)[0])
        np.testing.assert_allclose(f["score"][:], records[0].instance_scores, rtol=1e-6)
    capsys.readouterr()
    # bad input: named, nothing written
    assert main(base + ["--out", str(root / "m"), "--merge"]) == 2
    assert "--merge needs --threshold" in capsys.readouterr().err
    inside = folder.feature_dir / "geo"
    assert main(base + ["--out", str(inside)]) == 2
    assert "inside the source folder" in capsys.readouterr().err
    assert main(base + ["--out", str(out)]) == 2  # exists
    assert not (root / "m").exists() and tree(folder.root) == before


def test_cli_export_unknown_tile_size_names_the_slide(trident, tmp_path, capsys, monkeypatch):
    from graphmil.models import create_model
    from graphmil.train.checkpoint import save_checkpoint

    model = create_model("abmil", 8, 1, embed_dim=8, attention_dim=4)
    ck = save_checkpoint(str(tmp_path / "ck.pt"), model, model_spec=model.spec())
    dk = '{"num_bags": 4, "num_features": 8, "min_instances": 4, "max_instances": 8}'
    import graphmil.train.inference as inf

    real = inf._scalar_attrs

    def no_size(bag):  # bags without the attribute (e.g. a CLAM folder with no patches/ attrs)
        return {k: v for k, v in real(bag).items() if k != "patch_size_level0"}

    monkeypatch.setattr(inf, "_scalar_attrs", no_size)
    args = ["export", "--checkpoint", ck, "--dataset", "synthetic", "--dataset-kwargs", dk]
    assert main(args + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "slide 'synthetic-0-0': the tile size is unknown" in err and "--patch-size" in err
    assert not (tmp_path / "a").exists()
    assert main(args + ["--out", str(tmp_path / "b"), "--patch-size", "300"]) == 0
    with open(tmp_path / "b" / "synthetic-0-0.geojson") as f:
        fc = json.load(f)
    assert all(shape(f["geometry"]).area == 300 * 300 for f in fc["features"])


def test_cli_export_run_scores_each_slide_with_its_own_fold(tmp_path, capsys):
    import yaml

    cfg = {"model": {"name": "abmil", "kwargs": {"embed_dim": 8, "attention_dim": 4}},
           "data": {"dataset": "synthetic",
                    "kwargs": {"num_bags": 12, "num_features": 8, "min_instances": 4, "max_instances": 10}},
           "train": {"epochs": 1, "batch_size": 4, "progress": False, "device": "cpu"},
           "cv": {"folds": 3, "seeds": [0, 1], "val_fraction": 0.0}, "out": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    with open(tmp_path / "run" / "predictions.csv", newline="") as f:
        preds = [r for r in csv.DictReader(f) if r["split"] == "test"]
    for seed in ("0", "1"):
        out = tmp_path / f"exp{seed}"
        argv = ["export", "--run", str(tmp_path / "run"), "--out", str(out)] + (["--seed", seed] if seed == "1" else [])
        assert main(argv) == 0
        rows = {r["slide_id"]: r for r in preds if r["seed"] == seed}
        assert sorted(os.listdir(out)) == sorted(f"{s}.geojson" for s in rows)
        for sid, r in rows.items():  # the probability the held-out fold gave during training
            with open(out / f"{sid}.geojson") as f:
                fc = json.load(f)
            assert fc["properties"]["probabilities"]["1"] == pytest.approx(float(r["prob_1"]), abs=1e-6)
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "run"), "--seed", "7", "--out", str(tmp_path / "e7")]) == 2
    assert "seed 7 is not in the run" in capsys.readouterr().err
    assert not (tmp_path / "e7").exists()
