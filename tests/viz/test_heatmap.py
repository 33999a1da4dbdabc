import math

import numpy as np
import pytest

from graphmil.viz import (ATTENTION_RANGE, DEFAULT_CMAP, display_values, draw_heatmap, heatmap_title,
                          normalize_scores, plot_heatmap, scale_bar_length)


def _count(img, rgb, tol=0.08):
    return int((np.abs(img[..., :3] - np.asarray(rgb)).max(-1) < tol).sum())


def _grid(nx, ny, step=256):
    return np.stack(np.meshgrid(np.arange(nx), np.arange(ny)), -1).reshape(-1, 2) * step


@pytest.fixture
def axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []

    def make():
        fig, ax = plt.subplots()
        figs.append(fig)
        return ax

    yield make
    for f in figs:
        plt.close(f)


def _facecolors(art):
    art.mappable.update_scalarmappable()
    return np.asarray(art.mappable.get_facecolor())


def _viridis(x):
    from matplotlib import colormaps

    return np.asarray(colormaps["viridis"](x))


def test_normalize_scores():
    s = np.array([3.0, 1.0, 2.0, 5.0])
    np.testing.assert_allclose(normalize_scores(s, "minmax"), (s - 1) / 4)
    np.testing.assert_allclose(normalize_scores(s, "rank"), [2 / 3, 0, 1 / 3, 1])
    np.testing.assert_allclose(normalize_scores(np.ones(3)), [0.5] * 3)
    with pytest.raises(ValueError, match="mode"):
        normalize_scores(s, "zscore")


def test_default_colormap_is_viridis(axes):
    import inspect

    assert DEFAULT_CMAP == "viridis"
    assert inspect.signature(plot_heatmap).parameters["cmap"].default == "viridis"
    art = draw_heatmap(axes(), _grid(3, 2), np.arange(6.0), patch_size=256)
    assert art.mappable.cmap.name == "viridis"
    # the drawn colours are viridis's (independent reference: the colour map itself)
    np.testing.assert_allclose(_facecolors(art), _viridis(np.arange(6) / 5), atol=1e-12)


def test_grid_squares_colour_follows_scores(tmp_path):
    import matplotlib.image as mpimg

    pos = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [2, 1]]) * 256
    hi = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # five hot squares, one cold
    lo = 1.0 - hi  # five cold squares, one hot
    top, bottom = _viridis(1.0)[:3], _viridis(0.0)[:3]
    a = mpimg.imread(plot_heatmap(pos, hi, str(tmp_path / "hi.png"), patch_size=256))
    b = mpimg.imread(plot_heatmap(pos, lo, str(tmp_path / "lo.png"), patch_size=256))
    assert a.ndim == 3 and a.shape[0] > 100
    # the colour bar holds both extremes equally in both images; the squares make the difference
    assert _count(a, top) > _count(a, bottom) + 1000
    assert _count(b, bottom) > _count(b, top) + 1000


def test_minmax_maps_each_slide_max_to_top_colour(axes):
    rng = np.random.default_rng(1)
    for lo, hi in [(-3.0, -1.0), (10.0, 500.0)]:
        s = rng.uniform(lo, hi, 12)
        art = draw_heatmap(axes(), _grid(4, 3), s, patch_size=256)
        fc = _facecolors(art)
        np.testing.assert_allclose(fc[np.argmax(s)], _viridis(1.0), atol=1e-12)
        np.testing.assert_allclose(fc[np.argmin(s)], _viridis(0.0), atol=1e-12)
        assert "per-slide min–max" in art.colorbar.ax.get_ylabel()


def test_probability_scale_same_colour_on_two_slides(axes, tmp_path):
    import matplotlib.image as mpimg

    pos = _grid(3, 2)
    a = np.array([0.7, 0.7, 0.7, 0.7, 0.05, 0.1])  # slide A: 0.7 is its maximum
    b = np.array([0.7, 0.7, 0.7, 0.7, 0.95, 1.0])  # slide B: 0.7 is near its minimum
    fa = _facecolors(draw_heatmap(axes(), pos, a, patch_size=256, scale="probability"))
    fb = _facecolors(draw_heatmap(axes(), pos, b, patch_size=256, scale="probability"))
    np.testing.assert_array_equal(fa[:4], fb[:4])
    np.testing.assert_allclose(fa[0], _viridis(0.7), atol=1e-12)
    # control: per-slide min-max gives 0.7 different colours on the two slides
    ma = _facecolors(draw_heatmap(axes(), pos, a, patch_size=256))
    mb = _facecolors(draw_heatmap(axes(), pos, b, patch_size=256))
    assert np.abs(ma[0] - mb[0]).max() > 0.3
    # the PNGs: four large squares of viridis(0.7) in both
    ref = _viridis(0.7)[:3]
    ia = mpimg.imread(plot_heatmap(pos, a, str(tmp_path / "a.png"), patch_size=256, scale="probability"))
    ib = mpimg.imread(plot_heatmap(pos, b, str(tmp_path / "b.png"), patch_size=256, scale="probability"))
    na, nb = _count(ia, ref, tol=0.02), _count(ib, ref, tol=0.02)
    assert na > 20000 and nb > 20000 and abs(na - nb) < 0.1 * na


def test_attention_scale_is_absolute_log(axes):
    from matplotlib.colors import LogNorm

    assert ATTENTION_RANGE == (0.01, 100.0)
    # slide A: 4 instances, slide B: 6; the same attention x N gets the same colour on both
    va = np.array([1.0, 10.0, 1e-4, 2.99])
    vb = np.array([1.0, 10.0, 1000.0, 0.1, 0.5, 0.1])
    arts = [draw_heatmap(axes(), _grid(2, 2), va, patch_size=1, scale="attention"),
            draw_heatmap(axes(), _grid(3, 2), vb, patch_size=1, scale="attention")]
    for art in arts:
        assert isinstance(art.mappable.norm, LogNorm)
        assert (art.mappable.norm.vmin, art.mappable.norm.vmax) == (0.01, 100.0)
        assert "attention × N" in art.colorbar_label and "log scale" in art.colorbar_label
        assert art.colorbar.ax.get_ylabel() == art.colorbar_label
    fa, fb = (_facecolors(a) for a in arts)
    np.testing.assert_array_equal(fa[:2], fb[:2])
    # independent reference: log10 position in [-2, 2]; 1 = uniform is the middle colour
    np.testing.assert_allclose(fa[0], _viridis(0.5), atol=1e-12)
    np.testing.assert_allclose(fa[1], _viridis(0.75), atol=1e-12)
    np.testing.assert_allclose(fa[2], _viridis(0.0), atol=1e-12)  # clipped below
    np.testing.assert_allclose(fb[2], _viridis(1.0), atol=1e-12)  # clipped above
    # a custom range applies
    art = draw_heatmap(axes(), _grid(2, 2), va, patch_size=1, scale="attention",
                       attention_range=(0.1, 10))
    np.testing.assert_allclose(_facecolors(art)[1], _viridis(1.0), atol=1e-12)


def test_fixed_range_scale(axes):
    art = draw_heatmap(axes(), _grid(3, 1), np.array([0.0, -5.0, 5.0]), patch_size=1, scale=(-2, 2))
    fc = _facecolors(art)
    np.testing.assert_allclose(fc, _viridis(np.array([0.5, 0.0, 1.0])), atol=1e-12)
    assert "fixed range -2 to 2" in art.colorbar_label


def test_display_values_attention():
    import torch

    for n in (1, 3, 7, 49, 1000, 12345):
        np.testing.assert_array_equal(display_values(np.full(n, 1.0 / n), "attention"), np.ones(n))
    # float32 softmax of equal logits (as a model returns it)
    a = torch.softmax(torch.zeros(49), 0)
    np.testing.assert_array_equal(display_values(a, "attention"), np.ones(49))
    a = np.array([0.5, 0.25, 0.125, 0.125])
    np.testing.assert_allclose(display_values(a, "attention"), [2.0, 1.0, 0.5, 0.5])
    # several bags through 'index'
    s = np.array([0.5, 0.5, 0.1, 0.2, 0.7])
    np.testing.assert_allclose(display_values(s, "attention", index=[0, 0, 1, 1, 1]),
                               [1.0, 1.0, 0.3, 0.6, 2.1])
    # a subset of a bag of 100
    np.testing.assert_allclose(display_values([0.01, 0.05], "attention", num_instances=100), [1.0, 5.0])
    with pytest.raises(ValueError, match="sum to"):
        display_values(np.array([0.3, 0.3]), "attention")
    with pytest.raises(ValueError, match="bag 1"):
        display_values(np.array([0.5, 0.5, 0.1, 0.2, 0.6]), "attention", index=[0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="'scores'"):
        display_values(np.array([-0.5, 1.5]), "attention")  # logits, not weights
    with pytest.raises(ValueError, match="'num_instances'"):
        display_values(a, "attention", num_instances=0)
    with pytest.raises(ValueError, match="'index'"):
        display_values(a, "attention", index=[0, 1])


def test_display_values_probability():
    z = np.array([-1000.0, -2.0, 0.0, 3.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = display_values(z, "logit")
    np.testing.assert_allclose(p[1:4], 1.0 / (1.0 + np.exp(-z[1:4])), rtol=1e-15)
    assert p[0] == 0.0 and p[-1] == 1.0 and p[2] == 0.5
    np.testing.assert_array_equal(display_values([0.0, 0.3, 1.0], "probability"), [0.0, 0.3, 1.0])
    with pytest.raises(ValueError, match="'scores'.*logit"):
        display_values([0.2, 1.3], "probability")
    np.testing.assert_array_equal(display_values([-3, 4], "raw"), [-3.0, 4.0])
    with pytest.raises(ValueError, match="'kind'"):
        display_values([0.1], "softmax")
    with pytest.raises(ValueError, match="'scores'.*NaN"):
        display_values([0.1, float("nan")], "logit")


def test_heatmap_title():
    assert (heatmap_title("TCGA-01", label_name="tumor", prob=0.912, prob_name="tumor")
            == "TCGA-01: label tumor, p(tumor) = 0.91")
    assert (heatmap_title("s1", "normal", 0.1, "tumor", pred_name="normal", extra="ABMIL")
            == "s1: label normal, p(tumor) = 0.10, pred normal; ABMIL")
    assert heatmap_title("s2", prob=0.5) == "s2: p = 0.50"
    assert heatmap_title("s3") == "s3"
    assert heatmap_title(label_name="tumor") == "label tumor"
    assert heatmap_title(extra="x") == "x"
    assert heatmap_title() == ""
    for bad in (1.2, float("nan")):
        with pytest.raises(ValueError, match="'prob'"):
            heatmap_title("s", prob=bad)


def test_scale_bar_length():
    # independent: the 1-2-5 number closest (in ratio) to a fifth of the width
    assert scale_bar_length(10240) == 2000.0   # 2048
    assert scale_bar_length(24000) == 5000.0   # 4800
    assert scale_bar_length(4000) == 1000.0    # 800
    assert scale_bar_length(3000) == 500.0     # 600
    assert scale_bar_length(50000) == 10000.0  # 10000
    assert scale_bar_length(7.0) == 1.0        # 1.4
    with pytest.raises(ValueError, match="'extent'"):
        scale_bar_length(0)


def _bar_width(bar):
    from matplotlib.patches import Rectangle

    (rect,) = [c for c in bar.size_bar.get_children() if isinstance(c, Rectangle)]
    return rect.get_width()


def test_scale_bar_on_grid_patches(axes, tmp_path):
    pos = _grid(40, 30)  # 40 x 256 = 10,240 px wide
    s = np.random.default_rng(0).normal(size=len(pos))
    art = draw_heatmap(axes(), pos, s, patch_size=256)
    assert art.scale_bar_length == 2000.0 and _bar_width(art.scale_bar) == 2000.0
    assert art.scale_bar_label == "2,000 px (level 0)"
    assert art.scale_bar.txt_label.get_text() == "2,000 px (level 0)"
    # microns: 10,240 px x 0.5 um/px = 5,120 um -> 1,000 um = 2,000 px
    art = draw_heatmap(axes(), pos, s, patch_size=256, mpp=0.5)
    assert art.scale_bar.txt_label.get_text() == "1,000 µm (2,000 px, level 0)"
    assert _bar_width(art.scale_bar) == pytest.approx(2000.0)
    art = draw_heatmap(axes(), pos, s, patch_size=256, mpp=0.25)  # 2,560 um -> 500 um
    assert art.scale_bar.txt_label.get_text() == "500 µm (2,000 px, level 0)"
    # off on request, and off by default for dots
    assert draw_heatmap(axes(), pos, s, patch_size=256, scale_bar=False).scale_bar is None
    assert draw_heatmap(axes(), pos, s).scale_bar is None
    # it reaches the PNG: the black bar is drawn (the viridis grid holds no black)
    import matplotlib.image as mpimg

    with_bar = mpimg.imread(plot_heatmap(pos, s, str(tmp_path / "a.png"), patch_size=256))
    without = mpimg.imread(plot_heatmap(pos, s, str(tmp_path / "b.png"), patch_size=256,
                                        scale_bar=False))
    assert _count(with_bar, (0, 0, 0), tol=0.1) > _count(without, (0, 0, 0), tol=0.1) + 300


def test_dots_over_image_and_labels(tmp_path):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    image[:, :, 1] = 200  # a green background must show through
    pos = rng.uniform(10, 90, size=(30, 2))
    path = plot_heatmap(pos, rng.normal(size=30), str(tmp_path / "sub" / "dots.png"), image=image,
                        labels=(np.arange(30) % 2), title="dots")
    img = mpimg.imread(path)
    assert _count(img, (0, 200 / 255, 0), tol=0.05) > 500
    # absolute probability scale over the image, dots keep their colours
    path = plot_heatmap(pos, rng.uniform(size=30), str(tmp_path / "p.png"), image=image,
                        scale="probability", title=heatmap_title("img1", "epithelial"))
    assert _count(mpimg.imread(path), (0, 200 / 255, 0), tol=0.05) > 500


def test_dots_colours_and_legacy_normalize(axes):
    rng = np.random.default_rng(3)
    pos, s = rng.uniform(0, 100, (20, 2)), rng.normal(size=20)
    art = draw_heatmap(axes(), pos, s, scale="rank")
    np.testing.assert_allclose(_facecolors(art), _viridis(normalize_scores(s, "rank")), atol=1e-12)
    assert "per-slide rank" in art.colorbar_label
    # normalize=None (legacy) is the raw per-slide range
    art = draw_heatmap(axes(), pos, s, scale="raw")
    n = art.mappable.norm
    assert (n.vmin, n.vmax) == (s.min(), s.max())


def test_legacy_normalize_argument(tmp_path):
    pos, s = _grid(3, 1), np.array([1.0, 2.0, 4.0])
    # positional arguments of the old signature still work
    plot_heatmap(pos, s, str(tmp_path / "a.png"), None, 256, "t", "rank", "magma")
    plot_heatmap(pos, s, str(tmp_path / "b.png"), normalize=None)
    plot_heatmap(pos, s, str(tmp_path / "c.png"), normalize="minmax", scale="rank")
    with pytest.raises(ValueError, match="'normalize'"):
        plot_heatmap(pos, s, str(tmp_path / "d.png"), normalize="zscore")
    with pytest.raises(ValueError, match="'scale' only"):
        plot_heatmap(pos, s, str(tmp_path / "d.png"), normalize="rank", scale="probability")
    assert not (tmp_path / "d.png").exists()


def test_refuses_overwrite_and_bad_input(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(b"user file")
    with pytest.raises(ValueError, match="already exists"):
        plot_heatmap(np.zeros((2, 2)), np.zeros(2), str(p))
    assert p.read_bytes() == b"user file"
    b = str(tmp_path / "b.png")
    with pytest.raises(ValueError, match="rows but 'scores'"):
        plot_heatmap(np.zeros((3, 2)), np.zeros(2), b)
    with pytest.raises(ValueError, match=".png"):
        plot_heatmap(np.zeros((2, 2)), np.zeros(2), str(tmp_path / "b.jpg"))
    with pytest.raises(ValueError, match="'scale' must be one of"):
        plot_heatmap(np.zeros((2, 2)), np.zeros(2), b, scale="log")
    with pytest.raises(ValueError, match="'scale'"):
        plot_heatmap(np.zeros((2, 2)), np.zeros(2), b, scale=(1, 1))
    with pytest.raises(ValueError, match="'scores' holds 1 NaN"):
        plot_heatmap(np.zeros((2, 2)), np.array([0.1, math.nan]), b)
    with pytest.raises(ValueError, match="'scores'.*infinite"):
        plot_heatmap(np.zeros((2, 2)), np.array([0.1, math.inf]), b)
    with pytest.raises(ValueError, match="'scores'.*\\[0, 1\\]"):
        plot_heatmap(np.zeros((2, 2)), np.array([0.1, 2.0]), b, scale="probability")
    with pytest.raises(ValueError, match="display_values"):  # raw attention weights
        plot_heatmap(np.zeros((2, 2)), np.array([0.25, 0.75]), b, scale="attention")
    with pytest.raises(ValueError, match="'attention_range'"):
        plot_heatmap(np.zeros((2, 2)), np.ones(2), b, scale="attention", attention_range=(1, 10))
    with pytest.raises(ValueError, match="'cmap'"):
        plot_heatmap(np.zeros((2, 2)), np.zeros(2), b, cmap="nope")
    with pytest.raises(ValueError, match="'labels'"):
        plot_heatmap(np.zeros((2, 2)), np.zeros(2), b, labels=[1])
    with pytest.raises(ValueError, match="'mpp'"):
        plot_heatmap(np.zeros((2, 2)), np.zeros(2), b, patch_size=1, mpp=-1)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.png"]


def test_heatmap_of_prediction_draws_the_record_as_plot_heatmap_would(tmp_path):
    """The record helper is plot_heatmap on the record's own fields (same PNG bytes)."""
    from graphmil.train.inference import BagPrediction
    from graphmil.viz.heatmap import display_values, heatmap_of_prediction, heatmap_title, plot_heatmap

    rng = np.random.default_rng(0)
    pos = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) * 512
    logits = rng.normal(size=30)
    att = np.exp(logits) / np.exp(logits).sum()
    y_inst = (logits > 1).astype(np.int64)
    rec = BagPrediction(index=0, slide_id="s1", case_id="c1", label=1, logits=np.array([0.4]),
                        probabilities=np.array([0.4, 0.6]), pos=pos, instance_scores=logits,
                        attention=att, y_inst=y_inst, meta={"patch_size_level0": 512})
    title = heatmap_title("s1", label_name="tumor", prob=0.6, prob_name="tumor", pred_name="tumor")
    for scale, values, label in (("minmax", logits, "instance score"),
                                 ("attention", display_values(att, "attention"), "attention"),
                                 ("probability", 1 / (1 + np.exp(-logits)), "instance probability")):
        a = heatmap_of_prediction(rec, str(tmp_path / f"a_{scale}.png"), ["normal", "tumor"], scale=scale)
        b = plot_heatmap(pos, values, str(tmp_path / f"b_{scale}.png"), patch_size=512.0, title=title,
                         labels=y_inst, colorbar_label=label, scale=scale)
        assert open(a, "rb").read() == open(b, "rb").read(), scale
    rec.pos = None
    with pytest.raises(ValueError, match="no positions"):
        heatmap_of_prediction(rec, str(tmp_path / "x.png"))
