"""Random instance subsampling of bags (AEM's subsampling augmentation) as a PyG transform."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch_geometric.data import Batch, Data
from torch_geometric.transforms import BaseTransform

from graphmil.ops.batching import refresh_batch_slices
from graphmil.ops.masking import random_instance_mask

__all__ = ["RandomSubsample"]


class RandomSubsample(BaseTransform):
    r"""Keep a random subset of every bag's instances, restricting the graph consistently.

    Each call draws, independently for every bag,

    .. math::
        n_b = \min\big(N_b,\ \max(\lfloor r \cdot N_b \rfloor,\ n_{\min})\big)

    instances uniformly without replacement (AEM, Zhang et al. MICCAI 2025: "random ``⌊rN⌋``
    instances per bag per step") and returns ``data.subgraph(keep)``: every node-level attribute
    (``x``, ``pos``, ``y_inst``, ...) is restricted, the edges between kept instances survive with
    their edge-level attributes (``edge_weight``, ...) and are relabelled, graph-level attributes
    (``y``, ``slide_id``) are untouched. The kept instances stay in their original order; the
    kept rows are those of :func:`graphmil.ops.masking.random_instance_mask` with the same
    generator.

    Works on a single bag (``Data``) or a ``Batch`` (then per bag of the batch, with ``ptr`` and
    the batch's slicing information updated so ``to_data_list()`` still works).

    Args:
        ratio (float): ``r`` in ``(0, 1]`` (no default).
        min_instances (int): ``n_min`` (default ``1``).
        generator (torch.Generator, optional): source of randomness (default ``None``).
        seed (int, optional): builds a private ``torch.Generator`` seeded with ``seed`` (ignored
            when ``generator`` is given). Default ``None``: the global generator.

    Shapes:
        - **input:** a bag/batch with ``N`` instances
        - **output:** the same object type with ``Σ_b n_b`` instances

    Example:
        >>> from graphmil import make_bag
        >>> bag = make_bag(torch.randn(10, 4), pos=torch.randn(10, 2), y=1)
        >>> RandomSubsample(0.5, seed=0)(bag).num_nodes
        5
    """

    def __init__(
        self,
        ratio: float,
        min_instances: int = 1,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
    ) -> None:
        if not (0.0 < float(ratio) <= 1.0):
            raise ValueError(f"RandomSubsample: 'ratio' must be in (0, 1], got {ratio}")
        if int(min_instances) < 0:
            raise ValueError(f"RandomSubsample: 'min_instances' must be >= 0, got {min_instances}")
        self.ratio = float(ratio)
        self.min_instances = int(min_instances)
        self.seed = seed
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        self.generator = generator

    def forward(self, data: Union[Data, Batch]) -> Union[Data, Batch]:
        n = data.num_nodes
        if n is None or n == 0:
            return data
        is_batch = isinstance(data, Batch) and getattr(data, "batch", None) is not None
        if is_batch:
            index = data.batch
            num_bags = data.num_graphs
        else:
            index = torch.zeros(n, dtype=torch.long)
            num_bags = 1
        gen = self.generator
        dev = gen.device if gen is not None else index.device
        keep = random_instance_mask(index.to(dev), num_bags, self.ratio, self.min_instances, generator=gen)
        keep = keep.to(index.device)
        out = data.subgraph(keep)
        if is_batch:
            keys = [k for k in getattr(out, "_slice_dict", {}) if k not in ("batch", "ptr") and k in out]
            refresh_batch_slices(
                out,
                node=[k for k in keys if out.is_node_attr(k)],
                edge=[k for k in keys if out.is_edge_attr(k) and not out.is_node_attr(k)] if "edge_index" in out else [],
                num_bags=num_bags,
            )
        return out

    def __repr__(self) -> str:
        # a given generator is named by its initial seed (its current state is not part of a repr)
        gen = None if self.generator is None or self.seed is not None else f"Generator(initial_seed={self.generator.initial_seed()})"
        return (f"{self.__class__.__name__}(ratio={self.ratio}, min_instances={self.min_instances}, "
                f"generator={gen}, seed={self.seed})")
