r"""Classic MIL benchmarks without spatial structure: MUSK1, MUSK2 and UCSB breast cancer.

Read from ``<root>/<name>/<name>.npz`` (see the data folder's ``README.md``); nothing is written.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data, Dataset

from graphmil.data.bag import make_bag
from graphmil.datasets._common import ZScore, as_index_list, resolve_data_root

__all__ = ["ClassicMIL", "ZScore", "CLASSIC_DATASETS"]

#: Known sets: name -> (bags, positive bags, instances, features) as published.
CLASSIC_DATASETS = {
    "musk1": (92, 47, 476, 166),
    "musk2": (102, 39, 6598, 166),
    "ucsb_breast": (58, 26, 2002, 708),
}

_REQUIRED = ("X", "bag_ids", "bag_labels", "instance_labels")


class ClassicMIL(Dataset):
    r"""A classic MIL benchmark (MUSK1, MUSK2 of Dietterich et al. 1997; UCSB breast of Kandemir
    et al. 2014) as a PyG dataset of bags.

    Bag :math:`b` is a :class:`~torch_geometric.data.Data` with ``x`` (its instances' raw
    features, as published, float32), ``y = [Y_b]`` (0/1), ``y_inst`` (the file's
    ``instance_labels``: all :math:`-1`, these sets have no instance labels), ``slide_id``
    (the source bag name) and ``bag_index``. There is no ``pos`` or ``edge_index`` (no spatial
    structure). The reference protocol z-scores every feature,

    .. math::
        x'_{id} = (x_{id} - \mu_d) / \sigma_d, \qquad
        \mu_d, \sigma_d \text{ over the instances of the training bags},

    which :meth:`zscore` returns as a transform fitted on training bags only.

    Args:
        name (str): ``"musk1"``, ``"musk2"`` or ``"ucsb_breast"``.
        root (str, optional): folder holding ``<name>/<name>.npz``; ``None`` reads
            ``$GRAPHMIL_DATA``. (default: ``None``)
        transform (callable, optional): a PyG transform applied on every access. (default: ``None``)

    Shapes:
        - **x:** :math:`(N_b, D)`; **y:** :math:`(1,)`; **y_inst:** :math:`(N_b,)`

    Example::

        ds = ClassicMIL("musk1", root="../shared/data")
        folds = ds.folds()                      # the file's 5 x 10-fold protocol
        zs = ds.zscore(folds[0].train)          # statistics from training bags only
        train = ds.index_select(folds[0].train); train.transform = zs
    """

    def __init__(self, name: str, root: Optional[str] = None, transform: Optional[Callable] = None) -> None:
        if name not in CLASSIC_DATASETS:
            raise ValueError(
                f"ClassicMIL: unknown dataset 'name'={name!r}; known: {', '.join(sorted(CLASSIC_DATASETS))}"
            )
        self.name = name
        data_root = resolve_data_root(root, "ClassicMIL")
        self.path = os.path.join(data_root, name, f"{name}.npz")
        if not os.path.isfile(self.path):
            raise ValueError(f"ClassicMIL: file not found: {self.path}")
        try:
            z = np.load(self.path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"ClassicMIL: cannot read {self.path}: {e}") from None
        missing = [k for k in _REQUIRED if k not in z.files]
        if missing:
            raise ValueError(f"ClassicMIL: {self.path} lacks the arrays {missing}")
        x = np.asarray(z["X"], dtype=np.float32)
        bag_ids = np.asarray(z["bag_ids"], dtype=np.int64)
        bag_labels = np.asarray(z["bag_labels"], dtype=np.int64)
        inst = np.asarray(z["instance_labels"], dtype=np.int64)
        if x.ndim != 2 or bag_ids.shape != (x.shape[0],) or inst.shape != (x.shape[0],):
            raise ValueError(f"ClassicMIL: {self.path}: X, bag_ids and instance_labels have inconsistent shapes")
        nb = bag_labels.shape[0]
        if bag_ids.size and (np.any(np.diff(bag_ids) < 0) or bag_ids.min() < 0 or bag_ids.max() >= nb):
            raise ValueError(f"ClassicMIL: {self.path}: bag_ids must be sorted (contiguous bags) in 0..{nb - 1}")
        counts = np.bincount(bag_ids, minlength=nb)
        if (counts == 0).any():
            raise ValueError(f"ClassicMIL: {self.path}: bags {np.flatnonzero(counts == 0)[:5].tolist()} are empty")
        self._x = torch.from_numpy(x)
        self._y_inst = torch.from_numpy(inst)
        self._bag_labels = torch.from_numpy(bag_labels)
        self._ptr = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        self.bag_names: List[str] = [str(s) for s in z["bag_names"]] if "bag_names" in z.files else [
            str(i) for i in range(nb)
        ]
        self._folds_mask = np.asarray(z["folds_train_mask"], dtype=bool) if "folds_train_mask" in z.files else None
        self.root = data_root
        super().__init__(None, transform)
        self.root = data_root

    # ------------------------------------------------------------------ PyG Dataset API
    def len(self) -> int:
        return int(self._bag_labels.numel())

    def get(self, idx: int) -> Data:
        a, b = int(self._ptr[idx]), int(self._ptr[idx + 1])
        return make_bag(
            self._x[a:b].clone(),
            y=self._bag_labels[idx].view(1).clone(),
            y_inst=self._y_inst[a:b].clone(),
            slide_id=self.bag_names[idx],
            bag_index=int(idx),
        )

    # ------------------------------------------------------------------ helpers
    @property
    def labels(self) -> Tensor:
        """Bag labels ``[len(self)]`` (int64) in the dataset's (possibly subset) order."""
        return self._bag_labels[torch.as_tensor(list(self.indices()), dtype=torch.long)].clone()

    @property
    def num_instances(self) -> int:
        """Number of instances of all bags of the full dataset."""
        return int(self._x.size(0))

    @property
    def folds_train_mask(self) -> Optional[Tensor]:
        """The file's fixed CV protocol ``[repeats, folds, num_bags]`` bool (MUSK1), else ``None``."""
        return None if self._folds_mask is None else torch.from_numpy(self._folds_mask.copy())

    def folds(self) -> list:
        """The file's fixed protocol as :class:`graphmil.data.splits.Split` s (``test = ~mask``)."""
        if self._folds_mask is None:
            raise ValueError(
                f"ClassicMIL: '{self.name}' has no fixed folds (only musk1 does); "
                f"use graphmil.data.stratified_kfold(dataset.labels, k=10, repeats=5)"
            )
        from graphmil.data.splits import splits_from_masks

        return splits_from_masks(self._folds_mask)

    def zscore(self, train_idx: Any, eps: float = 1e-6) -> ZScore:
        r"""A :class:`ZScore` transform with statistics over the instances of the bags ``train_idx``.

        Args:
            train_idx: indices (list, array, tensor) or a boolean mask over the full dataset's bags.
            eps (float, optional): features with smaller std are only centred. (default: ``1e-6``)
        """
        idx = as_index_list(train_idx, self.len(), "ClassicMIL.zscore: 'train_idx'")
        return ZScore.fit([self._x[int(self._ptr[i]):int(self._ptr[i + 1])] for i in idx], eps=eps)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)}, name={self.name!r}, root={self.root!r})"
