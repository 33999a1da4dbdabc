r"""Colon-cancer bags (CRCHistoPhenotypes; Sirinukunwattana et al., IEEE TMI 2016).

The colon-cancer MIL set of Ilse et al. (ICML 2018): bag = one 500 x 500 H&E image, instance =
the 27 x 27 patch centred on a labelled nucleus, bag positive iff it holds an epithelial nucleus.
It is the one real set with both coordinates and instance labels. Read from
``<root>/colon_cancer/{bags_27px,images}.npz``; nothing is written there.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, List, Optional

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor
from torch_geometric.data import Data, Dataset

from graphmil.data.bag import make_bag
from graphmil.datasets._common import ZScore, as_index_list, resolve_data_root

__all__ = ["ColonCancerBags", "encode_patches", "HANDCRAFTED_FEATURES", "RUIFROK_HED"]

#: Ruifrok & Johnston (2001) H&E-DAB optical-density vectors (rows: haematoxylin, eosin, DAB),
#: as in scikit-image's ``rgb_from_hed``, each row normalised to unit length.
RUIFROK_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RUIFROK_HED = RUIFROK_HED / np.linalg.norm(RUIFROK_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(RUIFROK_HED)

_RADII = (3.0, 6.0, 9.0, 13.0)
_GREY_BINS = 8

#: Names of the columns of the handcrafted encoding (version 1), in order.
HANDCRAFTED_FEATURES: List[str] = (
    [f"rgb_mean_{c}" for c in "RGB"] + [f"rgb_std_{c}" for c in "RGB"]
    + [f"rgb_centre_mean_{c}" for c in "RGB"]
    + ["H_mean", "H_std", "H_q10", "H_q50", "H_q90", "H_centre", "H_ring", "H_outer",
       "E_mean", "E_std", "E_centre", "OD_sum_mean"]
    + [f"grey_hist_{b}" for b in range(_GREY_BINS)]
    + ["grey_ring_0_3", "grey_ring_3_6", "grey_ring_6_9", "grey_ring_9_13", "grey_ring_13_"]
    + ["grad_mean", "grad_std", "grad_centre", "laplace_abs_mean"]
    + ["nuc_area", "nuc_area_centre", "nuc_axis_major", "nuc_axis_minor", "nuc_eccentricity",
       "nuc_centroid_offset"]
)
_ENCODER_VERSION = "handcrafted-v1"


def _masks(size: int):
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r = np.sqrt((yy - c) ** 2 + (xx - c) ** 2)
    return yy - c, xx - c, r


def encode_patches(patches: np.ndarray, chunk: int = 2048) -> np.ndarray:
    r"""Deterministic handcrafted features of RGB nucleus patches (the ``'handcrafted'`` encoding).

    Vectorised over all patches (processed in chunks of ``chunk`` to bound memory; optical densities, H, E and grey are
    per-channel lookup tables of the uint8 values). With
    :math:`I \in [0, 255]^{S \times S \times 3}`, pixel radius :math:`r` from the patch centre,
    optical density and Ruifrok colour deconvolution

    .. math::
        \mathrm{OD} = -\log_{10}\frac{I + 1}{256}, \qquad
        [H, E, D] = \mathrm{OD}\, M^{-1},

    (:math:`M` = :data:`RUIFROK_HED`, unit rows), grey :math:`g = (0.299R + 0.587G + 0.114B)/255`,
    the 44 columns (:data:`HANDCRAFTED_FEATURES`) are: RGB mean/std over the patch and RGB mean
    in the centre disc (:math:`r \le 5`); H mean, std, 10/50/90 % quantiles (order statistics
    :math:`\lfloor q (S^2 - 1) \rfloor`) and mean in the centre
    disc, ring (:math:`5 < r \le 9`) and outside; E mean, std, centre mean; mean total OD; an
    8-bin histogram of :math:`g` on :math:`[0, 1]` (fractions); mean :math:`g` in the rings
    :math:`[0,3), [3,6), [6,9), [9,13), [13, \infty)`; gradient magnitude
    (central differences of :math:`g`) mean, std and centre mean, mean :math:`|\nabla^2 g|`;
    and a nucleus mask :math:`m = H \ge (q_{10}(H) + q_{90}(H))/2` restricted to :math:`r \le 9`:
    area fraction (whole and centre disc), :math:`\sqrt{\lambda_1}, \sqrt{\lambda_2}` of its pixel
    coordinates' covariance, eccentricity :math:`1 - \lambda_2/\lambda_1` and centroid distance
    from the centre.

    Args:
        patches: ``uint8 [N, S, S, 3]`` RGB patches (S = 27 for the colon set).
        chunk (int, optional): patches per vectorised block. (default: ``2048``)

    Returns:
        ``float32 [N, 44]``.

    Shapes:
        - **input:** :math:`(N, S, S, 3)`
        - **output:** :math:`(N, 44)`
    """
    p = np.asarray(patches)
    if p.ndim != 4 or p.shape[3] != 3 or p.shape[1] != p.shape[2]:
        raise ValueError(f"encode_patches: 'patches' must be [N, S, S, 3] RGB, got shape {p.shape}")
    if p.dtype != np.uint8:
        raise ValueError(f"encode_patches: 'patches' must be uint8, got {p.dtype}")
    size = p.shape[1]
    dy, dx, r = _masks(size)
    centre = (r <= 5).reshape(-1)
    ring = ((r > 5) & (r <= 9)).reshape(-1)
    outer = (r > 9).reshape(-1)
    core = (r <= 9).reshape(-1)
    rings = [(r < _RADII[0])] + [(r >= a) & (r < b) for a, b in zip(_RADII[:-1], _RADII[1:])] + [r >= _RADII[-1]]
    rings = np.stack([m.reshape(-1) for m in rings], axis=1).astype(np.float64)  # [P, 5]
    rings /= rings.sum(0, keepdims=True)
    ydy, xdx = dy.reshape(-1)[core], dx.reshape(-1)[core]

    npx = size * size
    kth = [int(q * (npx - 1)) for q in (0.1, 0.5, 0.9)]  # order statistics used as quantiles
    # Per-channel lookup tables: OD(v) = -log10((v + 1) / 256); H, E, total OD and grey are sums
    # of one table lookup per RGB channel.
    od_lut = -np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)
    lut_h = (od_lut[None, :] * _HED_FROM_RGB[:, 0:1]).astype(np.float32)  # [3, 256]
    lut_e = (od_lut[None, :] * _HED_FROM_RGB[:, 1:2]).astype(np.float32)
    lut_od = od_lut.astype(np.float32)
    lut_g = (np.array([0.299, 0.587, 0.114])[:, None] * np.arange(256)[None, :] / 255.0).astype(np.float32)
    rings32 = rings.astype(np.float32)

    out = np.empty((p.shape[0], len(HANDCRAFTED_FEATURES)), dtype=np.float32)
    for s in range(0, p.shape[0], chunk):
        q = p[s:s + chunk].reshape(-1, npx, 3)  # uint8 [n, P, 3]
        n = q.shape[0]
        R, G, B = q[..., 0], q[..., 1], q[..., 2]
        flat = q.astype(np.float32) * np.float32(1 / 255.0)  # [n, P, 3]
        H = lut_h[0][R] + lut_h[1][G] + lut_h[2][B]  # [n, P]
        E = lut_e[0][R] + lut_e[1][G] + lut_e[2][B]
        od_sum = lut_od[R] + lut_od[G] + lut_od[B]
        grey = lut_g[0][R] + lut_g[1][G] + lut_g[2][B]
        cols = []
        cols += [flat.mean(1), flat.std(1), flat[:, centre].mean(1)]
        hq = np.partition(H, kth, axis=1)[:, kth]  # [n, 3]
        cols += [np.stack([H.mean(1), H.std(1)], 1), hq,
                 np.stack([H[:, centre].mean(1), H[:, ring].mean(1), H[:, outer].mean(1),
                           E.mean(1), E.std(1), E[:, centre].mean(1), od_sum.mean(1)], 1)]
        # grey histogram (fractions), one bincount over (patch, bin) pairs
        b = np.minimum((grey * _GREY_BINS).astype(np.int64), _GREY_BINS - 1)
        hist = np.bincount((np.arange(n)[:, None] * _GREY_BINS + b).ravel(), minlength=n * _GREY_BINS)
        cols.append(hist.reshape(n, _GREY_BINS) / npx)
        cols.append(grey @ rings32)
        # gradients (central differences) and Laplacian of the grey image
        g2 = grey.reshape(n, size, size)
        gy = np.zeros_like(g2)
        gx = np.zeros_like(g2)
        gy[:, 1:-1] = (g2[:, 2:] - g2[:, :-2]) * 0.5
        gx[:, :, 1:-1] = (g2[:, :, 2:] - g2[:, :, :-2]) * 0.5
        mag = np.sqrt(gx * gx + gy * gy).reshape(n, -1)
        lap = (g2[:, 1:-1, 2:] + g2[:, 1:-1, :-2] + g2[:, 2:, 1:-1] + g2[:, :-2, 1:-1] - 4 * g2[:, 1:-1, 1:-1])
        cols.append(np.stack([mag.mean(1), mag.std(1), mag[:, centre].mean(1),
                              np.abs(lap).reshape(n, -1).mean(1)], 1))
        # nucleus mask from haematoxylin, shape moments inside r <= 9
        thr = (hq[:, 0] + hq[:, 2]) / 2
        m = (H >= thr[:, None]).astype(np.float64)
        mc = m[:, core]
        area = mc.sum(1)
        w = mc / np.maximum(area, 1)[:, None]
        cy, cx = w @ ydy, w @ xdx
        syy = w @ (ydy ** 2) - cy ** 2
        sxx = w @ (xdx ** 2) - cx ** 2
        sxy = w @ (ydy * xdx) - cy * cx
        tr, det = syy + sxx, syy * sxx - sxy ** 2
        disc = np.sqrt(np.maximum(tr ** 2 / 4 - det, 0))
        l1 = np.maximum(tr / 2 + disc, 0)
        l2 = np.maximum(tr / 2 - disc, 0)
        ecc = np.where(l1 > 1e-12, 1 - l2 / np.maximum(l1, 1e-12), 0.0)
        cols.append(np.stack([m.mean(1), m[:, centre].mean(1), np.sqrt(l1), np.sqrt(l2), ecc,
                              np.sqrt(cy ** 2 + cx ** 2)], 1))
        out[s:s + n] = np.concatenate(cols, axis=1)
    return out


def _sym_sorted(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """Symmetric, duplicate-free, self-loop-free edges sorted by (row, col)."""
    row = np.concatenate([src, dst]).astype(np.int64)
    col = np.concatenate([dst, src]).astype(np.int64)
    keep = row != col
    key = np.sort(row[keep] * n + col[keep])
    if key.size:
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    return np.stack([key // n, key % n]) if key.size else np.zeros((2, 0), dtype=np.int64)


class ColonCancerBags(Dataset):
    r"""Colon-cancer bags of Ilse et al. (2018) from CRCHistoPhenotypes (Sirinukunwattana et al., 2016).

    Bag :math:`b` = image :math:`b` (100 H&E images of 500 x 500 px); its instances are the
    27 x 27 patches centred on the labelled nuclei (22,444 in all, 1 to 796 per image);
    ``y_inst`` = 1 for epithelial nuclei, ``y = [\max_i y^{\text{inst}}_i]`` (51 positive bags).
    ``pos`` holds the nucleus centres ``coords_xy`` as float32 pixel coordinates (x = column,
    y = row, within ``[0, 500]``); patch :math:`i` is
    ``image[floor(y)-13 : floor(y)+14, floor(x)-13 : floor(x)+14]`` (zero-padded at the borders).
    The spatial graph joins nuclei closer than ``radius`` px,

    .. math::
        (i, j) \in E \iff i \ne j,\ \lVert p_i - p_j \rVert_2 \le r

    (``graph="radius"``, :class:`scipy.spatial.cKDTree`), or each nucleus to its ``k`` nearest
    neighbours, symmetrised (``graph="knn"``), or none (``graph=None``).

    Features (``features=``):

    - ``"handcrafted"``: the deterministic 44-column encoding of :func:`encode_patches`
      (colour statistics in RGB and in Ruifrok H&E optical density, grey-level histogram and
      radial profile, gradient statistics, nucleus-mask shape). Raw scales: z-score them with
      :meth:`zscore` fitted on training bags. Computed once per dataset (about 2-4 s on one
      core); with ``cache_dir`` they are stored there as ``.npy`` keyed by the encoder version
      and the source file's size and modification time.
    - ``"raw"``: the pixels, ``x = patch / 255`` as float32 ``[N, 3 * 27 * 27]`` in CHW order
      (``x.view(-1, 3, 27, 27)`` gives images for an end-to-end CNN encoder).

    Every bag also carries ``instance_class [N]`` (1 epithelial, 2 fibroblast, 3 inflammatory,
    4 others), ``slide_id`` (the image name, e.g. ``"img1"``) and ``image_index``; draw
    heatmaps over :meth:`image`.

    Args:
        root (str, optional): folder holding ``colon_cancer/``; ``None`` reads ``$GRAPHMIL_DATA``.
            (default: ``None``)
        features (str, optional): ``"handcrafted"`` or ``"raw"``. (default: ``"handcrafted"``)
        graph (str, optional): ``"radius"``, ``"knn"`` or ``None``. (default: ``"radius"``)
        radius (float, optional): radius of the radius graph in pixels. (default: ``25.0``)
        k (int, optional): neighbours of the k-NN graph. (default: ``8``)
        cache_dir (str, optional): where to cache handcrafted features (never the data folder);
            ``None`` uses ``$GRAPHMIL_CACHE`` when set, else recomputes them. (default: ``None``)
        transform (callable, optional): a PyG transform applied on every access. (default: ``None``)

    Shapes:
        - **x:** :math:`(N_b, 44)` (handcrafted) or :math:`(N_b, 2187)` (raw), float32
        - **pos:** :math:`(N_b, 2)` float32; **edge_index:** :math:`(2, E_b)`
        - **y:** :math:`(1,)`; **y_inst**, **instance_class:** :math:`(N_b,)`

    Example::

        ds = ColonCancerBags(root="../shared/data")            # handcrafted features, r = 25 px
        bag = ds[0]; img = ds.image(0)                           # uint8 [500, 500, 3]
        zs = ds.zscore(train_idx)                                # statistics of training bags
    """

    def __init__(
        self,
        root: Optional[str] = None,
        features: str = "handcrafted",
        graph: Optional[str] = "radius",
        radius: float = 25.0,
        k: int = 8,
        cache_dir: Optional[str] = None,
        transform: Optional[Callable] = None,
    ) -> None:
        if features not in ("handcrafted", "raw"):
            raise ValueError(f"ColonCancerBags: 'features' must be 'handcrafted' or 'raw', got {features!r}")
        if graph not in ("radius", "knn", None):
            raise ValueError(f"ColonCancerBags: 'graph' must be 'radius', 'knn' or None, got {graph!r}")
        if not (float(radius) > 0):
            raise ValueError(f"ColonCancerBags: 'radius' must be > 0, got {radius!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ColonCancerBags: 'k' must be an integer >= 1, got {k!r}")
        self.features = features
        self.graph = graph
        self.radius = float(radius)
        self.k = int(k)
        self.cache_dir = cache_dir if cache_dir is not None else (os.environ.get("GRAPHMIL_CACHE") or None)
        data_root = resolve_data_root(root, "ColonCancerBags")
        self.folder = os.path.join(data_root, "colon_cancer")
        self.bags_path = os.path.join(self.folder, "bags_27px.npz")
        self.images_path = os.path.join(self.folder, "images.npz")
        if not os.path.isfile(self.bags_path):
            raise ValueError(f"ColonCancerBags: file not found: {self.bags_path}")
        try:
            z = np.load(self.bags_path, allow_pickle=False)
            keys = set(z.files)
            need = {"patches", "bag_ids", "instance_labels", "coords_xy", "bag_labels", "image_names"}
            if not need <= keys:
                raise ValueError(f"lacks the arrays {sorted(need - keys)}")
            patches = z["patches"]
            bag_ids = z["bag_ids"].astype(np.int64)
            self._y_inst = torch.from_numpy(z["instance_labels"].astype(np.int64))
            self._class = torch.from_numpy(z["instance_class"].astype(np.int64)) if "instance_class" in keys else None
            coords = z["coords_xy"].astype(np.float32)
            self._bag_labels = torch.from_numpy(z["bag_labels"].astype(np.int64))
            self.image_names: List[str] = [str(s) for s in z["image_names"]]
            self.sfcn_split: List[str] = [str(s) for s in z["sfcn_split"]] if "sfcn_split" in keys else []
        except ValueError as e:
            raise ValueError(f"ColonCancerBags: {self.bags_path}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"ColonCancerBags: cannot read {self.bags_path}: {e}") from None
        nb = int(self._bag_labels.numel())
        if np.any(np.diff(bag_ids) < 0) or bag_ids.min() < 0 or bag_ids.max() >= nb:
            raise ValueError(f"ColonCancerBags: {self.bags_path}: bag_ids must be sorted in 0..{nb - 1}")
        counts = np.bincount(bag_ids, minlength=nb)
        self._ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._pos = torch.from_numpy(coords)

        if features == "handcrafted":
            self._x = torch.from_numpy(self._handcrafted(patches))
            self._patches = None
        else:
            self._x = None
            self._patches = torch.from_numpy(np.ascontiguousarray(patches))  # uint8 [N, 27, 27, 3]
        self._edges = [self._build_graph(coords[self._ptr[b]:self._ptr[b + 1]]) for b in range(nb)]
        self._images: Optional[np.ndarray] = None
        super().__init__(None, transform)
        self.root = data_root

    # ------------------------------------------------------------------ construction helpers
    def _handcrafted(self, patches: np.ndarray) -> np.ndarray:
        if self.cache_dir is None:
            return encode_patches(patches)
        cache_dir = os.path.abspath(os.path.expanduser(self.cache_dir))
        if os.path.commonpath([cache_dir, self.folder]) == self.folder:
            raise ValueError(f"ColonCancerBags: 'cache_dir' {cache_dir} is inside the data folder; choose another")
        st = os.stat(self.bags_path)
        tag = hashlib.sha1(f"{_ENCODER_VERSION}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        path = os.path.join(cache_dir, f"colon_cancer_{_ENCODER_VERSION}_{tag}.npy")
        if os.path.isfile(path):
            x = np.load(path)
            if x.shape == (patches.shape[0], len(HANDCRAFTED_FEATURES)):
                return x
        x = encode_patches(patches)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        np.save(tmp, x)
        os.replace(tmp, path)
        return x

    def _build_graph(self, pts: np.ndarray) -> Tensor:
        n = pts.shape[0]
        if self.graph is None or n < 2:
            return torch.zeros((2, 0), dtype=torch.long)
        tree = cKDTree(pts.astype(np.float64))
        if self.graph == "radius":
            pairs = tree.query_pairs(self.radius, output_type="ndarray")
            src, dst = pairs[:, 0], pairs[:, 1]
        else:
            kk = min(self.k + 1, n)
            _, nbr = tree.query(pts.astype(np.float64), k=kk)
            src = np.repeat(np.arange(n), kk)
            dst = nbr.reshape(-1)
        return torch.from_numpy(_sym_sorted(src, dst, n))

    # ------------------------------------------------------------------ PyG Dataset API
    def len(self) -> int:
        return int(self._bag_labels.numel())

    def get(self, idx: int) -> Data:
        a, b = int(self._ptr[idx]), int(self._ptr[idx + 1])
        if self._x is not None:
            x = self._x[a:b].clone()
        else:
            x = self._patches[a:b].permute(0, 3, 1, 2).reshape(b - a, -1).to(torch.float32) / 255.0
        return make_bag(
            x,
            pos=self._pos[a:b].clone(),
            y=self._bag_labels[idx].view(1).clone(),
            y_inst=self._y_inst[a:b].clone(),
            edge_index=self._edges[idx],
            slide_id=self.image_names[idx],
            image_index=int(idx),
            instance_class=None if self._class is None else self._class[a:b].clone(),
        )

    # ------------------------------------------------------------------ helpers
    @property
    def labels(self) -> Tensor:
        """Bag labels ``[len(self)]`` (int64) in the dataset's (possibly subset) order."""
        return self._bag_labels[torch.as_tensor(list(self.indices()), dtype=torch.long)].clone()

    @property
    def feature_names(self) -> List[str]:
        """Column names of ``x`` (handcrafted) or ``c{channel}_y{row}_x{col}`` (raw)."""
        if self.features == "handcrafted":
            return list(HANDCRAFTED_FEATURES)
        return [f"c{c}_y{i}_x{j}" for c in range(3) for i in range(27) for j in range(27)]

    def image(self, i: int) -> np.ndarray:
        """The H&E image of bag ``i`` (of the full dataset): ``uint8 [500, 500, 3]``."""
        i = int(i)
        if not 0 <= i < self.len():
            raise ValueError(f"ColonCancerBags.image: index {i} out of range 0..{self.len() - 1}")
        if self._images is None:
            if not os.path.isfile(self.images_path):
                raise ValueError(f"ColonCancerBags: file not found: {self.images_path}")
            with np.load(self.images_path, allow_pickle=False) as z:
                names = [str(s) for s in z["image_names"]]
                if names != self.image_names:
                    raise ValueError(f"ColonCancerBags: {self.images_path}: image_names differ from bags_27px.npz")
                self._images = z["images"]
        return self._images[i]

    def zscore(self, train_idx: Any, eps: float = 1e-6) -> ZScore:
        r"""A :class:`ZScore` transform fitted on the instances of bags ``train_idx`` (full-dataset indices)."""
        idx = as_index_list(train_idx, self.len(), "ColonCancerBags.zscore: 'train_idx'")
        if self._x is not None:
            xs = [self._x[int(self._ptr[i]):int(self._ptr[i + 1])] for i in idx]
        else:
            xs = [self.get(i).x for i in idx]
        return ZScore.fit(xs, eps=eps)

    def __repr__(self) -> str:
        g = f"radius={self.radius}" if self.graph == "radius" else (f"k={self.k}" if self.graph == "knn" else "none")
        return (f"{self.__class__.__name__}({len(self)}, features={self.features!r}, graph={self.graph!r} "
                f"({g}), root={self.root!r})")
