"""The bag data model: one slide (or image, or molecule) as a PyG :class:`Data` object."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data

__all__ = ["make_bag", "validate_bag"]


def _as_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"make_bag: '{name}' has dtype object; expected a numeric array")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple, int, float, bool, np.integer, np.floating)):
        return torch.as_tensor(value)
    raise ValueError(f"make_bag: '{name}' must be a tensor or array, got {type(value).__name__}")


def make_bag(
    x: Any,
    pos: Any = None,
    y: Any = None,
    y_inst: Any = None,
    edge_index: Any = None,
    slide_id: Optional[str] = None,
    **attrs: Any,
) -> Data:
    r"""Build a validated bag: a :class:`~torch_geometric.data.Data` holding one slide.

    The result batches with :meth:`Batch.from_data_list` and PyG's ``DataLoader``: instances are
    concatenated, ``batch``/``ptr`` index the bags and ``edge_index`` becomes block-diagonal.

    Args:
        x: instance features ``[N, D]``; floating point, finite. Converted to ``float32``
            (``float16``/``bfloat16`` features from TRIDENT are up-cast).
        pos: instance coordinates ``[N, 2]`` (level-0 pixels or grid units). Integer coordinates
            stay ``int64`` and are never rescaled; floating coordinates stay floating.
        y: bag label, a scalar or ``[1]`` (class index / binary label) or ``[1, C]`` / ``[C]``
            (multi-label; stored as ``[1, C]`` so batching gives ``[B, C]``).
        y_inst: instance labels ``[N]``, integers, ``-1`` meaning unknown.
        edge_index: spatial graph ``[2, E]`` (``int64``, node ids in ``0..N-1``).
        slide_id: identifier of the slide, kept as ``data.slide_id``.
        **attrs: any other attribute (``edge_weight [E]``, source attributes such as
            ``patch_size_level0`` or ``step_level0``) stored as given.

    Returns:
        The bag as :class:`~torch_geometric.data.Data`.

    Raises:
        ValueError: naming the argument, for wrong shapes or dtypes, NaN/Inf features, an empty
            bag, coordinates or instance labels whose length differs from ``x``, edges pointing
            outside the bag, or a malformed label.

    Example:
        >>> import torch
        >>> bag = make_bag(torch.randn(5, 8), pos=torch.arange(10).view(5, 2), y=1)
        >>> bag.x.shape, bag.y
        (torch.Size([5, 8]), tensor([1]))
    """
    x = _as_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"make_bag: 'x' must be 2-D [N, D], got shape {tuple(x.shape)}")
    if x.size(0) == 0:
        raise ValueError("make_bag: 'x' is empty (a bag needs at least one instance)")
    if x.size(1) == 0:
        raise ValueError("make_bag: 'x' has zero feature columns")
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"make_bag: 'x' must be numeric, got dtype {x.dtype}")
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"make_bag: 'x' has NaN or Inf values in {bad.numel()} instance(s) "
            f"(first rows: {bad[:5].tolist()})"
        )
    n = x.size(0)
    data = Data(x=x)

    if pos is not None:
        pos = _as_tensor(pos, "pos")
        if pos.dim() != 2 or pos.size(0) != n or pos.size(1) < 2:
            raise ValueError(
                f"make_bag: 'pos' must be [N, 2] with N = {n} (rows of 'x'), got shape {tuple(pos.shape)}"
            )
        if pos.is_floating_point():
            if not torch.isfinite(pos).all():
                raise ValueError("make_bag: 'pos' has NaN or Inf values")
        elif pos.dtype == torch.bool:
            raise ValueError("make_bag: 'pos' must be numeric, got dtype bool")
        else:
            pos = pos.to(torch.int64)
        data.pos = pos

    if y is not None:
        y = _as_tensor(y, "y")
        if y.dim() == 0:
            y = y.view(1)
        elif y.dim() == 1 and y.numel() > 1:
            y = y.view(1, -1)  # multi-label [C] -> [1, C]
        elif y.dim() == 2 and y.size(0) != 1:
            raise ValueError(f"make_bag: 'y' must be a scalar, [1], [C] or [1, C], got shape {tuple(y.shape)}")
        elif y.dim() > 2:
            raise ValueError(f"make_bag: 'y' must be a scalar, [1], [C] or [1, C], got shape {tuple(y.shape)}")
        if y.is_floating_point() and not torch.isfinite(y).all():
            raise ValueError("make_bag: 'y' has NaN or Inf values")
        if not y.is_floating_point() and y.dtype != torch.bool:
            y = y.to(torch.int64)
        data.y = y

    if y_inst is not None:
        y_inst = _as_tensor(y_inst, "y_inst")
        if y_inst.dim() != 1 or y_inst.numel() != n:
            raise ValueError(f"make_bag: 'y_inst' must be [N] with N = {n}, got shape {tuple(y_inst.shape)}")
        if y_inst.is_floating_point():
            if not torch.isfinite(y_inst).all() or (y_inst != y_inst.round()).any():
                raise ValueError("make_bag: 'y_inst' must hold integer labels (-1 = unknown)")
        y_inst = y_inst.to(torch.int64)
        if (y_inst < -1).any():
            raise ValueError("make_bag: 'y_inst' has values below -1 (-1 means unknown)")
        data.y_inst = y_inst

    if edge_index is not None:
        edge_index = _as_tensor(edge_index, "edge_index")
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"make_bag: 'edge_index' must be [2, E], got shape {tuple(edge_index.shape)}")
        if edge_index.is_floating_point():
            raise ValueError("make_bag: 'edge_index' must hold integers")
        edge_index = edge_index.to(torch.int64)
        if edge_index.numel() > 0 and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
            raise ValueError(
                f"make_bag: 'edge_index' refers to nodes outside 0..{n - 1} "
                f"(min {int(edge_index.min())}, max {int(edge_index.max())})"
            )
        data.edge_index = edge_index

    if "edge_weight" in attrs and attrs["edge_weight"] is not None:
        w = _as_tensor(attrs["edge_weight"], "edge_weight").to(torch.float32)
        num_edges = 0 if edge_index is None else edge_index.size(1)
        if w.dim() != 1 or w.numel() != num_edges:
            raise ValueError(f"make_bag: 'edge_weight' must be [E] with E = {num_edges}, got shape {tuple(w.shape)}")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("make_bag: 'edge_weight' must be finite and non-negative")
        attrs["edge_weight"] = w

    if slide_id is not None:
        data.slide_id = str(slide_id)
    for key, value in attrs.items():
        if value is not None:
            data[key] = value
    return data


def validate_bag(data: Data, name: str = "bag") -> Data:
    """Re-run :func:`make_bag`'s checks on an existing :class:`Data` and return it unchanged.

    Args:
        data: a bag.
        name: how the bag is named in error messages (a file name, a slide id).

    Raises:
        ValueError: prefixed with ``name``, as :func:`make_bag` would raise.
    """
    extra = {k: data[k] for k in data.keys() if k not in ("x", "pos", "y", "y_inst", "edge_index", "slide_id")}
    try:
        make_bag(
            data.x, pos=data.get("pos"), y=data.get("y"), y_inst=data.get("y_inst"),
            edge_index=data.get("edge_index"), slide_id=data.get("slide_id"), **extra,
        )
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return data
