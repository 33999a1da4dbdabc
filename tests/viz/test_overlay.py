"""Heatmaps over the slide: a small pyramidal TIFF (tifffile, sub-resolution levels) with a
coloured "tumour" square; the thumbnail comes from the right pyramid level at the right scale, the
tiles land at their level-0 position and size (overlapping patches averaged, checked against a
per-pixel loop), the hottest region of the heatmap lands on the square as seen in the thumbnail's
own pixels, the tissue shows through (alpha), and ``graphmil heatmap --slides`` uses the slide file
when it is there and the tile grid when it is not."""

import os

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("tiffslide")

from PIL import Image  # noqa: E402

from graphmil.train.inference import BagPrediction  # noqa: E402
from graphmil.viz.overlay import (blend_heatmap, find_slide, open_slide, overlay_heatmap,  # noqa: E402
                                  rasterize_tiles, slide_mpp, slide_thumbnail)

W0, H0 = 4096, 3072
SQUARE = (2048, 1024, 3072, 2048)  # x0, y0, x1, y1 in level-0 px: the "tumour"
BG, RED = (236, 220, 228), (200, 30, 40)


def write_pyramid(path, image, downsamples=(2, 4, 8), mpp=0.5):
    """A tiled pyramidal TIFF: level 0 plus sub-resolution IFDs, as tiffslide / OpenSlide read it."""
    opts = dict(tile=(256, 256), photometric="rgb", compression="zlib")
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=len(downsamples), resolution=(1e4 / mpp, 1e4 / mpp),
                  resolutionunit="CENTIMETER", **opts)
        for k in downsamples:
            tif.write(image[::k, ::k], subfiletype=1, **opts)
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    img = np.empty((H0, W0, 3), np.uint8)
    img[:] = BG
    x0, y0, x1, y1 = SQUARE
    img[y0:y1, x0:x1] = RED
    rng = np.random.default_rng(0)
    img[::7, ::5] = np.clip(img[::7, ::5].astype(int) + rng.integers(-8, 8, size=img[::7, ::5].shape), 0, 255)
    return write_pyramid(str(d / "slide_a.tif"), img)


def record(pos, scores, ps, slide_id="slide_a", attention=None):
    return BagPrediction(index=0, slide_id=slide_id, case_id=slide_id, label=1,
                         logits=np.zeros(1, np.float32), probabilities=np.array([0.1, 0.9]),
                         pos=np.asarray(pos, dtype=np.int64), instance_scores=np.asarray(scores, np.float32),
                         attention=attention, meta={"patch_size_level0": ps})


def tiles_over_slide(step=256, ps=256):
    xs = np.arange(512, W0 - 512 - ps + 1, step)
    ys = np.arange(256, H0 - 256 - ps + 1, step)
    pos = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    x0, y0, x1, y1 = SQUARE
    inside = (pos[:, 0] >= x0) & (pos[:, 0] + ps <= x1) & (pos[:, 1] >= y0) & (pos[:, 1] + ps <= y1)
    rng = np.random.default_rng(1)
    scores = np.where(inside, 3.0 + rng.uniform(0, 0.01, len(pos)), rng.uniform(-1, 0, len(pos)))
    return pos, scores, inside


def square_in_thumbnail(thumb):
    """Bounding box of the red square, found from the thumbnail's own pixels (not from the scale)."""
    m = (np.abs(thumb.astype(int) - np.asarray(RED)).max(-1) < 30)
    ys, xs = np.nonzero(m)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, m


def test_thumbnail_from_the_level_near_the_width(slide):
    s = open_slide(slide)
    try:
        assert s.level_count == 4 and tuple(s.dimensions) == (W0, H0)
        assert slide_mpp(s) == pytest.approx(0.5)
    finally:
        s.close()
    for width, ds in ((512, 8.0), (1000, W0 / 1000), (6000, 1.0)):
        thumb, d = slide_thumbnail(slide, width)
        assert d == pytest.approx(ds)
        assert thumb.dtype == np.uint8 and thumb.shape == (round(H0 / d), min(width, W0), 3)
        bx0, by0, bx1, by1, _ = square_in_thumbnail(thumb)
        x0, y0, x1, y1 = SQUARE
        assert abs(bx0 - x0 / d) <= 2 and abs(by0 - y0 / d) <= 2 and abs(bx1 - x1 / d) <= 2 and abs(by1 - y1 / d) <= 2
    with pytest.raises(FileNotFoundError, match="nope.svs"):
        open_slide(os.path.join(os.path.dirname(slide), "nope.svs"))


@pytest.mark.parametrize("step", [256, 128])
def test_hottest_region_lands_on_the_square(slide, tmp_path, step):
    pos, scores, inside = tiles_over_slide(step=step)
    rec = record(pos, scores, 256)
    out = overlay_heatmap(rec, slide, str(tmp_path / "raw.png"), width=512, decorate=False, alpha=0.5)
    png = np.asarray(Image.open(out.path).convert("RGB"))
    np.testing.assert_array_equal(png, out.image)  # the PNG is the thumbnail's pixel frame
    thumb = out.thumbnail
    bx0, by0, bx1, by1, red = square_in_thumbnail(thumb)
    v = out.values
    hot = v >= np.nanmax(v) - 0.05  # the hottest pixels of the heatmap
    ys, xs = np.nonzero(hot)
    assert xs.min() >= bx0 - 1 and xs.max() < bx1 + 1 and ys.min() >= by0 - 1 and ys.max() < by1 + 1
    # ... and they cover the square (the tiles inside fill it; with overlapping patches, a pixel
    # within one step of the border is also covered by a tile that straddles it, and averaged)
    margin = int(np.ceil((256 - step) / out.downsample))
    core = np.zeros_like(red)
    core[by0 + margin:by1 - margin, bx0 + margin:bx1 - margin] = True
    assert (hot & core).sum() / core.sum() > 0.95
    if step < 256:  # the overlap-averaged border is cooler than the core, hotter than outside
        ring = red & ~core
        assert np.nanmean(v[ring]) < np.nanmax(v) - 0.05 and np.nanmean(v[ring]) > np.nanmean(v[~red & ~np.isnan(v)])
    # alpha blend: the tissue shows through, exactly (1 - a) * slide + a * colour
    from matplotlib import colormaps

    top = np.asarray(colormaps["viridis"](out.norm(np.nanmax(v)))[:3]) * 255
    exp = 0.5 * thumb[hot].astype(float) + 0.5 * top
    assert np.abs(png[hot].astype(float) - exp).max() <= 1.0
    assert not np.array_equal(png[hot], np.broadcast_to(np.rint(top).astype(np.uint8), png[hot].shape))
    uncovered = np.isnan(v)
    assert uncovered.any()
    np.testing.assert_array_equal(png[uncovered], thumb[uncovered])  # outside the tiles: the slide alone


def test_tiles_at_real_size_and_overlaps_averaged_against_a_pixel_loop():
    rng = np.random.default_rng(2)
    ps, d = 300, 7.3
    pos = rng.integers(0, 2000, size=(25, 2))
    vals = rng.normal(size=25)
    H, W = 320, 310
    mean, count = rasterize_tiles(pos, vals, ps, d, (H, W))
    ref_sum, ref_cnt = np.zeros((H, W)), np.zeros((H, W), int)
    for (x, y), v in zip(pos, vals):
        c0, c1 = int(round(x / d)), max(int(round((x + ps) / d)), int(round(x / d)) + 1)
        r0, r1 = int(round(y / d)), max(int(round((y + ps) / d)), int(round(y / d)) + 1)
        for r in range(max(r0, 0), min(r1, H)):
            for c in range(max(c0, 0), min(c1, W)):
                ref_sum[r, c] += v
                ref_cnt[r, c] += 1
    np.testing.assert_array_equal(count, ref_cnt)
    assert count.max() >= 2  # overlapping tiles exist
    ok = ref_cnt > 0
    np.testing.assert_allclose(mean[ok], ref_sum[ok] / ref_cnt[ok], atol=1e-9)
    assert np.isnan(mean[~ok]).all()
    # one tile is ps / d pixels wide and tall
    m1, c1 = rasterize_tiles([[700, 700]], [1.0], ps, d, (H, W))
    rows, cols = np.nonzero(c1)
    assert abs((cols.max() - cols.min() + 1) - ps / d) <= 1 and abs((rows.max() - rows.min() + 1) - ps / d) <= 1
    with pytest.raises(ValueError, match="must match"):
        blend_heatmap(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4)))


def test_decorated_figure_and_errors(slide, tmp_path):
    pos, scores, _ = tiles_over_slide()
    rec = record(pos, scores, 256, attention=np.full(len(pos), 1.0 / len(pos)))
    out = overlay_heatmap(rec, slide, str(tmp_path / "fig.png"), width=400, class_names=["normal", "tumor"],
                          scale="attention")
    img = Image.open(out.path)
    assert img.size[0] > 300 and "absolute" in out.colorbar_label
    with pytest.raises(ValueError, match="already exists"):
        overlay_heatmap(rec, slide, out.path)
    rec.meta = {}
    with pytest.raises(ValueError, match="slide 'slide_a': the tile size is unknown"):
        overlay_heatmap(rec, slide, str(tmp_path / "x.png"))
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match="cannot open slide '.*broken.tif'"):
        open_slide(bad)
    assert str(find_slide(os.path.dirname(slide), "slide_a")) == slide
    assert find_slide(os.path.dirname(slide), "other") is None


def test_cli_heatmap_over_the_slide_file(tmp_path, capsys, monkeypatch):
    import h5py

    from graphmil.cli import main
    from graphmil.io import write_synthetic_folder
    from graphmil.models import create_model
    from graphmil.train.checkpoint import save_checkpoint

    monkeypatch.setenv("GRAPHMIL_CACHE", str(tmp_path / "cache"))
    # 20x scan patched at 20x with 32-px patches: a slide of ~2,500 px
    folder = write_synthetic_folder(tmp_path / "feat", layout="trident", num_slides=2, num_features=8,
                                    magnification=20, target_magnification=20, patch_size=32, num_contours=1)
    sid = folder.slide_ids[1]
    with h5py.File(folder.feature_file(sid), "r") as f:
        coords, attrs = f["coords"][:], dict(f["coords"].attrs)
    w, h = int(attrs["level0_width"]), int(attrs["level0_height"])
    img = np.full((h, w, 3), 240, np.uint8)
    for x, y in coords:
        img[y:y + 32, x:x + 32] = (170, 90, 160)  # "tissue" under every patch
    slides = tmp_path / "wsi"
    slides.mkdir()
    write_pyramid(str(slides / f"{sid}.tif"), img, downsamples=(2, 4))
    model = create_model("abmil", 8, 1, embed_dim=8, attention_dim=4)
    ck = save_checkpoint(str(tmp_path / "ck.pt"), model, model_spec=model.spec())
    argv = ["heatmap", "--checkpoint", ck, "--folder", str(folder.root), "--labels", str(folder.labels_path),
            "--bag", folder.slide_ids[0], "--bag", sid, "--slides", str(slides), "--width", "600"]
    assert main(argv + ["--out", str(tmp_path / "hm")]) == 0
    cap = capsys.readouterr()
    assert f"over {slides / (sid + '.tif')}" in cap.out
    assert f"no slide file for '{folder.slide_ids[0]}'" in cap.err  # the other one: the tile grid
    assert sorted(os.listdir(tmp_path / "hm")) == sorted(f"{s}.png" for s in folder.slide_ids)
    assert main(argv[:-2] + ["--width", "4", "--out", str(tmp_path / "hm2")]) == 2
    assert "--width" in capsys.readouterr().err and not (tmp_path / "hm2").exists()
