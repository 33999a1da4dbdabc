r"""Seeded synthetic spatial bags: tissue-shaped patch grids with contiguous "tumour" blobs.

The embedded dataset of graphmil: the demo, the tests and the benchmarks use it, so it needs no
download. Every bag is generated from ``(seed, index)`` alone, lazily on access, with vectorised
numpy (a 100k-instance bag takes a fraction of a second).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torch_geometric.data import Data, Dataset

from graphmil.data.bag import make_bag
from graphmil.ops.geometry import grid_edges

__all__ = ["SyntheticBags"]

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity structure for scipy.ndimage.label


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float, channels: int,
                  rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Unit-variance spatially correlated Gaussian noise at grid cells ``(rows, cols)``.

    iid ``N(0, 1)`` values on a coarse lattice of spacing ``cell`` are bilinearly interpolated and
    renormalised by the interpolation weights' norm (so the variance is 1 everywhere); the
    correlation length is about ``cell`` grid cells.

    Returns:
        ``[len(rows), channels]`` float64.
    """
    cell = max(float(cell), 1e-6)
    gh, gw = int(h / cell) + 3, int(w / cell) + 3
    coarse = rng.standard_normal((gh, gw, channels))
    r = rows / cell
    c = cols / cell
    r0 = np.floor(r).astype(np.int64)
    c0 = np.floor(c).astype(np.int64)
    tr = (r - r0)[:, None]
    tc = (c - c0)[:, None]
    w00, w01, w10, w11 = (1 - tr) * (1 - tc), (1 - tr) * tc, tr * (1 - tc), tr * tc
    out = (w00 * coarse[r0, c0] + w01 * coarse[r0, c0 + 1]
           + w10 * coarse[r0 + 1, c0] + w11 * coarse[r0 + 1, c0 + 1])
    return out / np.sqrt(w00 ** 2 + w01 ** 2 + w10 ** 2 + w11 ** 2)


def _range(value: Union[float, Sequence[float]], name: str, low: float, high: float) -> Tuple[float, float]:
    if isinstance(value, (int, float)):
        lo = hi = float(value)
    else:
        vals = tuple(value)
        if len(vals) != 2:
            raise ValueError(f"SyntheticBags: '{name}' must be a number or a (min, max) pair, got {value!r}")
        lo, hi = float(vals[0]), float(vals[1])
    if not (low <= lo <= hi <= high):
        raise ValueError(f"SyntheticBags: '{name}' must satisfy {low} <= min <= max <= {high}, got {value!r}")
    return lo, hi


class SyntheticBags(Dataset):
    r"""Seeded synthetic whole-slide bags on a patch grid, with contiguous tumour blobs.

    Each bag is a tissue-shaped set of patches on a square lattice, with level-0 coordinates
    ``pos = patch_size * (col, row) + origin`` (``int64``), and its 8-neighbour ``edge_index``.
    A positive bag (``y = 1``) holds ``1..max_blobs`` "tumour" blobs, each connected in the
    8-neighbour graph; negative bags hold none. Instance labels ``y_inst`` are 1 in tumour, else
    0, and ``blob`` gives the blob number (0 = no tumour). Features are

    .. math::
        \mathbf{x}_i = \sigma\,\boldsymbol{\varepsilon}_i
            + \tau\,\mathbf{g}(\mathbf{p}_i)
            + s\, y^{\text{inst}}_i\, \mathbf{w},
        \qquad \boldsymbol{\varepsilon}_i \sim \mathcal{N}(0, I_D),

    where :math:`\mathbf{w}` is a unit tumour direction fixed by ``feature_seed``, :math:`s` =
    ``signal``, :math:`\sigma` = ``noise`` (independent per instance) and :math:`\mathbf{g}` a
    unit-variance Gaussian field with correlation length ``correlation_length`` grid cells, scaled
    by :math:`\tau` = ``spatial_noise`` (tissue heterogeneity shared by neighbours). Since
    tumour is spatially contiguous while :math:`\boldsymbol{\varepsilon}` is independent,
    averaging over graph neighbours (e.g. Sm) raises the instance signal-to-noise ratio.

    Generation (all vectorised, per bag, from ``numpy.random.default_rng([seed, index])``):

    1. bag size :math:`n` uniform (or log-uniform) in ``[min_instances, max_instances]``;
    2. tissue: on an :math:`H \times W` canvas of about :math:`3n` cells, the :math:`n` cells of
       largest :math:`\max_j \bigl(1 - \lVert R_j(\mathbf{c} - \mathbf{m}_j) / \mathbf{a}_j\rVert^2\bigr)
       + 0.3\,\text{noise}` over ``1..max_pieces`` random ellipses (tissue pieces with ragged
       borders);
    3. tumour (positive bags): a total of :math:`\max(1, \mathrm{round}(f n))` instances, ``f`` uniform in
       ``tumour_fraction``, split over the blobs; each blob grows from a random tissue cell
       to its nearest cells by a noisy anisotropic distance, restricted to free tissue, and keeps
       only the 8-connected component of its seed.

    Bag labels are exactly balanced: ``round(pos_fraction * num_bags)`` positives, at positions
    drawn from ``seed``. Bags are generated lazily in :meth:`get`; with ``in_memory`` they are
    cached after the first access (the default when the dataset is small).

    Args:
        num_bags (int, optional): number of bags. (default: ``64``)
        num_features (int, optional): feature dimension :math:`D`. (default: ``32``)
        seed (int, optional): the dataset's seed. Same seed, same tensors. (default: ``0``)
        min_instances (int, optional): smallest bag size. (default: ``50``)
        max_instances (int, optional): largest bag size. (default: ``400``)
        size_distribution (str, optional): ``"uniform"`` or ``"loguniform"`` bag sizes in
            ``[min_instances, max_instances]``. (default: ``"uniform"``)
        signal (float, optional): tumour shift :math:`s` along :math:`\mathbf{w}`, in units of
            the instance noise. (default: ``2.0``)
        pos_fraction (float, optional): fraction of positive bags. (default: ``0.5``)
        tumour_fraction (float or (float, float), optional): range of the fraction of a positive
            bag's instances that are tumour. (default: ``(0.05, 0.3)``)
        max_blobs (int, optional): a positive bag has ``1..max_blobs`` blobs. (default: ``3``)
        noise (float, optional): independent instance noise :math:`\sigma`. (default: ``1.0``)
        spatial_noise (float, optional): spatially correlated noise :math:`\tau`. (default: ``0.5``)
        correlation_length (float, optional): correlation length of :math:`\mathbf{g}` in grid
            cells. (default: ``4.0``)
        max_pieces (int, optional): a bag has ``1..max_pieces`` tissue pieces. (default: ``3``)
        patch_size (int, optional): grid step in level-0 pixels (``step_level0`` and
            ``patch_size_level0`` of every bag). (default: ``256``)
        feature_seed (int, optional): seed of the tumour direction :math:`\mathbf{w}`, kept
            apart from ``seed`` so that datasets with different seeds (e.g. a train and a test
            set) share one feature distribution. (default: ``0``)
        in_memory (bool, optional): cache generated bags. ``None`` caches when
            ``num_bags * max_instances * num_features <= 2**25``. (default: ``None``)
        transform (callable, optional): a PyG transform applied on every access. (default: ``None``)

    Shapes:
        - **x:** :math:`(N, D)` float32
        - **pos:** :math:`(N, 2)` int64, (x, y) level-0 pixels, scan order (row-major)
        - **edge_index:** :math:`(2, E)` int64, 8-neighbour, symmetric, no self-loops
        - **y:** :math:`(1,)` int64; **y_inst**, **blob:** :math:`(N,)` int64

    Example:
        >>> ds = SyntheticBags(num_bags=4, num_features=8, seed=0)
        >>> bag = ds[0]
        >>> bag.x.shape[1], bool((bag.y_inst.max() > 0) == bool(bag.y))
        (8, True)
    """

    num_features: int = 0  # shadows Dataset.num_features (a property) so the argument is stored

    def __init__(
        self,
        num_bags: int = 64,
        num_features: int = 32,
        seed: int = 0,
        min_instances: int = 50,
        max_instances: int = 400,
        size_distribution: str = "uniform",
        signal: float = 2.0,
        pos_fraction: float = 0.5,
        tumour_fraction: Union[float, Tuple[float, float]] = (0.05, 0.3),
        max_blobs: int = 3,
        noise: float = 1.0,
        spatial_noise: float = 0.5,
        correlation_length: float = 4.0,
        max_pieces: int = 3,
        patch_size: int = 256,
        feature_seed: int = 0,
        in_memory: Optional[bool] = None,
        transform: Optional[Callable] = None,
    ) -> None:
        def _int(v, name, low):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"SyntheticBags: '{name}' must be an integer >= {low}, got {v!r}")
            return int(v)

        self.num_bags = _int(num_bags, "num_bags", 1)
        self.num_features = _int(num_features, "num_features", 1)
        self.seed = _int(seed, "seed", 0)
        self.min_instances = _int(min_instances, "min_instances", 1)
        self.max_instances = _int(max_instances, "max_instances", 1)
        if self.max_instances < self.min_instances:
            raise ValueError(
                f"SyntheticBags: 'max_instances' ({max_instances}) is smaller than 'min_instances' ({min_instances})"
            )
        if size_distribution not in ("uniform", "loguniform"):
            raise ValueError(
                f"SyntheticBags: 'size_distribution' must be 'uniform' or 'loguniform', got {size_distribution!r}"
            )
        self.size_distribution = size_distribution
        for name, v in (("signal", signal), ("noise", noise), ("spatial_noise", spatial_noise)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"SyntheticBags: '{name}' must be a finite number >= 0, got {v!r}")
        self.signal = float(signal)
        self.noise = float(noise)
        self.spatial_noise = float(spatial_noise)
        if not (isinstance(pos_fraction, (int, float)) and 0.0 <= pos_fraction <= 1.0):
            raise ValueError(f"SyntheticBags: 'pos_fraction' must be in [0, 1], got {pos_fraction!r}")
        self.pos_fraction = float(pos_fraction)
        _range(tumour_fraction, "tumour_fraction", 0.0, 1.0)
        self.tumour_fraction = tumour_fraction
        self.max_blobs = _int(max_blobs, "max_blobs", 1)
        if not (isinstance(correlation_length, (int, float)) and correlation_length > 0):
            raise ValueError(f"SyntheticBags: 'correlation_length' must be > 0, got {correlation_length!r}")
        self.correlation_length = float(correlation_length)
        self.max_pieces = _int(max_pieces, "max_pieces", 1)
        self.patch_size = _int(patch_size, "patch_size", 1)
        self.feature_seed = _int(feature_seed, "feature_seed", 0)
        if in_memory is None:
            in_memory = self.num_bags * self.max_instances * self.num_features <= 2 ** 25
        self.in_memory = bool(in_memory)
        self._cache: Dict[int, Data] = {}

        # Dataset-level randomness: bag labels (exact balance) and the feature directions.
        rng = np.random.default_rng([self.seed, 0x5EED])
        n_pos = int(round(self.pos_fraction * self.num_bags))
        labels = np.zeros(self.num_bags, dtype=np.int64)
        labels[rng.permutation(self.num_bags)[:n_pos]] = 1
        self._labels = labels
        w = np.random.default_rng([self.feature_seed, 0xD1]).standard_normal(self.num_features)
        self._direction = w / np.linalg.norm(w)

        super().__init__(None, transform)

    # ----------------------------------------------------------------- PyG Dataset API
    def len(self) -> int:
        return self.num_bags

    def get(self, idx: int) -> Data:
        idx = int(idx)
        if idx in self._cache:
            return self._cache[idx].clone()
        data = self.generate(idx)
        if self.in_memory:
            self._cache[idx] = data
            return data.clone()
        return data

    # ----------------------------------------------------------------- helpers
    @property
    def labels(self) -> Tensor:
        """Bag labels of all bags ``[num_bags]`` (without generating the bags)."""
        return torch.from_numpy(self._labels[self.indices()].copy())

    @property
    def direction(self) -> Tensor:
        """The unit tumour direction :math:`\\mathbf{w}` ``[num_features]`` (float32)."""
        return torch.from_numpy(self._direction.astype(np.float32))

    def _size(self, rng: np.random.Generator) -> int:
        lo, hi = self.min_instances, self.max_instances
        if self.size_distribution == "uniform":
            return int(rng.integers(lo, hi + 1))
        return int(min(hi, max(lo, math.floor(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))))

    def bag_sizes(self) -> Tensor:
        """Number of instances of every bag ``[len(self)]``, without generating the bags."""
        return torch.tensor(
            [self._size(np.random.default_rng([self.seed, int(i)])) for i in self.indices()],
            dtype=torch.long,
        )

    def generate(self, idx: int) -> Data:
        """Generate bag ``idx`` (of the full dataset, ignoring subset views) from ``(seed, idx)``."""
        if not 0 <= idx < self.num_bags:
            raise ValueError(f"SyntheticBags: index {idx} out of range 0..{self.num_bags - 1}")
        rng = np.random.default_rng([self.seed, idx])
        n = self._size(rng)
        label = int(self._labels[idx])

        # 1. canvas of ~3n cells with a random aspect ratio
        aspect = math.exp(rng.uniform(-0.4, 0.4))
        h = max(3, int(math.ceil(math.sqrt(3.0 * n / aspect))) + 2)
        w = max(3, int(math.ceil(3.0 * n / (h - 2))) + 2)
        rows = np.repeat(np.arange(h, dtype=np.float64), w)
        cols = np.tile(np.arange(w, dtype=np.float64), h)

        # 2. tissue: top-n cells of a max over random ellipses plus rough noise
        n_pieces = int(rng.integers(1, self.max_pieces + 1))
        score = np.full(h * w, -np.inf)
        for _ in range(n_pieces):
            mr, mc = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ar, ac = rng.uniform(0.15, 0.45) * h, rng.uniform(0.15, 0.45) * w
            th = rng.uniform(0, math.pi)
            dr, dc = rows - mr, cols - mc
            u = (math.cos(th) * dr + math.sin(th) * dc) / ar
            v = (-math.sin(th) * dr + math.cos(th) * dc) / ac
            np.maximum(score, 1.0 - (u * u + v * v), out=score)
        rough = _smooth_noise(rng, h, w, max(2.0, math.sqrt(n) / 6.0), 1, rows, cols)[:, 0]
        score += 0.3 * rough
        flat = np.sort(np.argpartition(-score, n - 1)[:n]) if n < h * w else np.arange(h * w)
        r_i = flat // w
        c_i = flat % w

        # 3. tumour blobs
        blob = np.zeros(n, dtype=np.int64)
        if label == 1:
            lo, hi = _range(self.tumour_fraction, "tumour_fraction", 0.0, 1.0)
            total = max(1, int(round(rng.uniform(lo, hi) * n)))
            n_blobs = int(rng.integers(1, self.max_blobs + 1))
            grid = np.full((h, w), -1, dtype=np.int64)  # instance index of each cell, -1 = background
            grid[r_i, c_i] = np.arange(n)
            for b in range(n_blobs):
                target = max(1, total // n_blobs + (1 if b < total % n_blobs else 0))
                free = np.flatnonzero(blob == 0)
                if free.size == 0:
                    break
                seed_i = int(free[rng.integers(free.size)])
                # restrict to the free-tissue component that holds the seed
                free_mask = np.zeros((h, w), dtype=bool)
                free_mask[r_i[free], c_i[free]] = True
                comp, _ = ndimage.label(free_mask, structure=_EIGHT)
                cand = free[comp[r_i[free], c_i[free]] == comp[r_i[seed_i], c_i[seed_i]]]
                # noisy anisotropic distance from the seed
                th = rng.uniform(0, math.pi)
                elong = math.exp(rng.uniform(-0.5, 0.5))
                dr = (r_i[cand] - r_i[seed_i]).astype(np.float64)
                dc = (c_i[cand] - c_i[seed_i]).astype(np.float64)
                u = (math.cos(th) * dr + math.sin(th) * dc) * elong
                v = (-math.sin(th) * dr + math.cos(th) * dc) / elong
                radius = math.sqrt(target / math.pi) + 1.0
                prio = np.sqrt(u * u + v * v) / radius
                prio += 0.5 * _smooth_noise(rng, h, w, max(1.5, radius / 2.0), 1,
                                            r_i[cand].astype(np.float64), c_i[cand].astype(np.float64))[:, 0]
                prio[cand == seed_i] = -np.inf
                k = min(target, cand.size)
                chosen = cand[np.argpartition(prio, k - 1)[:k]] if k < cand.size else cand
                # keep only the 8-connected component of the seed
                mask = np.zeros((h, w), dtype=bool)
                mask[r_i[chosen], c_i[chosen]] = True
                comp, _ = ndimage.label(mask, structure=_EIGHT)
                keep = chosen[comp[r_i[chosen], c_i[chosen]] == comp[r_i[seed_i], c_i[seed_i]]]
                blob[keep] = b + 1
        y_inst = (blob > 0).astype(np.int64)

        # 4. features
        x = self.noise * rng.standard_normal((n, self.num_features))
        if self.spatial_noise > 0:
            x += self.spatial_noise * _smooth_noise(
                rng, h, w, self.correlation_length, self.num_features,
                r_i.astype(np.float64), c_i.astype(np.float64),
            )
        x += self.signal * y_inst[:, None] * self._direction[None, :]

        # 5. coordinates and 8-neighbour graph
        origin = rng.integers(0, 64, size=2) * self.patch_size
        pos = np.stack([c_i * self.patch_size + origin[0], r_i * self.patch_size + origin[1]], axis=1)
        pos_t = torch.from_numpy(pos.astype(np.int64))
        # The step is known by construction (one lattice, one origin): the shared builder takes its
        # dense-lattice lookup; the edges equal the brute-force 8-neighbour oracle (tested).
        edge_index, _ = grid_edges(pos, step=self.patch_size, connectivity=8, check_step=False)
        return make_bag(
            torch.from_numpy(x.astype(np.float32)),
            pos=pos_t,
            y=torch.tensor([label], dtype=torch.long),
            y_inst=torch.from_numpy(y_inst),
            edge_index=edge_index,
            slide_id=f"synthetic-{self.seed}-{idx}",
            blob=torch.from_numpy(blob),
            step_level0=self.patch_size,
            patch_size_level0=self.patch_size,
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({len(self)}, num_bags={self.num_bags}, num_features={self.num_features}, "
            f"seed={self.seed}, instances=[{self.min_instances}, {self.max_instances}] "
            f"({self.size_distribution}), signal={self.signal}, pos_fraction={self.pos_fraction}, "
            f"tumour_fraction={self.tumour_fraction}, max_blobs={self.max_blobs}, noise={self.noise}, "
            f"spatial_noise={self.spatial_noise}, correlation_length={self.correlation_length}, "
            f"patch_size={self.patch_size}, feature_seed={self.feature_seed})"
        )
