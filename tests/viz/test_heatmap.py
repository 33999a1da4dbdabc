import numpy as np
import pytest

from graphmil.viz import normalize_scores, plot_heatmap


def _count(img, rgb, tol=0.08):
    return int((np.abs(img[..., :3] - np.asarray(rgb)).max(-1) < tol).sum())


def test_normalize_scores():
    s = np.array([3.0, 1.0, 2.0, 5.0])
    np.testing.assert_allclose(normalize_scores(s, "minmax"), (s - 1) / 4)
    np.testing.assert_allclose(normalize_scores(s, "rank"), [2 / 3, 0, 1 / 3, 1])
    np.testing.assert_allclose(normalize_scores(np.ones(3)), [0.5] * 3)
    with pytest.raises(ValueError, match="mode"):
        normalize_scores(s, "zscore")


def test_grid_squares_colour_follows_scores(tmp_path):
    import matplotlib.image as mpimg
    from matplotlib import colormaps

    pos = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [2, 1]]) * 256
    hi = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # five hot squares, one cold
    lo = 1.0 - hi  # five cold squares, one hot
    red, blue = colormaps["jet"](1.0)[:3], colormaps["jet"](0.0)[:3]
    a = mpimg.imread(plot_heatmap(pos, hi, str(tmp_path / "hi.png"), patch_size=256))
    b = mpimg.imread(plot_heatmap(pos, lo, str(tmp_path / "lo.png"), patch_size=256))
    assert a.ndim == 3 and a.shape[0] > 100
    # the colour bar holds both extremes equally in both images; the squares make the difference
    assert _count(a, red) > _count(a, blue) + 1000
    assert _count(b, blue) > _count(b, red) + 1000


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


def test_refuses_overwrite_and_bad_input(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(b"user file")
    with pytest.raises(ValueError, match="already exists"):
        plot_heatmap(np.zeros((2, 2)), np.zeros(2), str(p))
    assert p.read_bytes() == b"user file"
    with pytest.raises(ValueError, match="rows"):
        plot_heatmap(np.zeros((3, 2)), np.zeros(2), str(tmp_path / "b.png"))
    with pytest.raises(ValueError, match=".png"):
        plot_heatmap(np.zeros((2, 2)), np.zeros(2), str(tmp_path / "b.jpg"))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.png"]
