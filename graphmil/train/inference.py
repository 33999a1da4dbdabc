r"""Inference, written once: :func:`predict` yields one record per bag; :func:`evaluate`, the
heatmaps, the score export, ``predictions.csv`` and the demo all read those records.

A record keeps what a bag's prediction is made of — ids, label, class probabilities, and per
instance the positions, scores and attention — so no caller re-reads a bag or splits flattened
arrays by bag again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["BagPrediction", "predict", "evaluate", "Evaluation", "metrics_from_predictions",
           "probabilities_of"]


@dataclass
class BagPrediction:
    """The prediction of one bag (what :func:`predict` yields).

    Attributes:
        index: position of the bag in the dataset given to :func:`predict`.
        slide_id, case_id: ids (``bag<i>`` / the slide id when the bag has none).
        label: the bag's class index (``None`` when the bag has no ``y``).
        logits: bag logits ``[C]`` (float32).
        probabilities: class probabilities ``[max(2, C)]``: ``(1 - p, p)`` for one-logit models.
        pos: instance coordinates ``[n, 2]`` (``None`` without ``pos``).
        instance_scores: ``[n]`` (or ``[n, H]``) instance scores, ``None`` if the model gives none.
        attention: ``[n]`` or ``[n, H]`` attention weights, ``None`` for models without attention.
        y_inst: instance labels ``[n]`` (``None`` when unknown).
        meta: the bag's scalar attributes (``patch_size_level0``, ``step_level0``, ...).
    """

    index: int
    slide_id: str
    case_id: str
    label: Optional[int]
    logits: np.ndarray
    probabilities: np.ndarray
    pos: Optional[np.ndarray] = None
    instance_scores: Optional[np.ndarray] = None
    attention: Optional[np.ndarray] = None
    y_inst: Optional[np.ndarray] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_instances(self) -> int:
        for a in (self.instance_scores, self.attention, self.pos, self.y_inst):
            if a is not None:
                return int(a.shape[0])
        return 0

    def prediction(self, threshold: float = 0.5) -> int:
        """The predicted class: ``p_1 >= threshold`` for binary tasks, argmax otherwise."""
        p = self.probabilities
        return int(p[1] >= threshold) if p.shape[0] == 2 else int(p.argmax())

    def score(self, head: str = "mean") -> Optional[np.ndarray]:
        """Instance scores as one value per instance (``[n, H]`` averaged over heads)."""
        s = self.instance_scores
        return None if s is None else (s if s.ndim == 1 else s.mean(axis=1))

    def to_data(self):
        """A PyG ``Data`` holding ``pos`` and the scalar attributes (for
        :func:`graphmil.io.write_scores`)."""
        from torch_geometric.data import Data

        d = Data(pos=torch.from_numpy(self.pos) if self.pos is not None else None)
        for k, v in self.meta.items():
            d[k] = v
        d.slide_id = self.slide_id
        return d


def probabilities_of(logits: np.ndarray) -> np.ndarray:
    r"""Class probabilities ``[B, max(2, C)]`` of bag logits ``[B, C]``: ``(1-σ(ℓ), σ(ℓ))`` for
    one logit, softmax otherwise."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return np.stack([1.0 - p, p], axis=1)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _scalar_attrs(bag) -> Dict[str, Any]:
    out = {}
    for k in bag.keys():
        if k in ("slide_id", "case_id"):
            continue
        v = bag[k]
        if isinstance(v, (int, float, str, bool, np.generic)):
            out[k] = v.item() if isinstance(v, np.generic) else v
        elif isinstance(v, torch.Tensor) and v.numel() == 1 and k not in ("y", "x", "pos", "batch", "ptr"):
            out[k] = v.item()
    return out


def _device_of(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is not None:
        return p.device
    b = next(iter(model.buffers()), None)
    return b.device if b is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, batch_size: int = 16, device=None,
            instances: bool = True, progress: bool = False) -> Iterator[BagPrediction]:
    """Run ``model`` over ``dataset`` (in order, in eval mode, batched without padding) and yield
    one :class:`BagPrediction` per bag.

    Args:
        model: a trained :class:`~graphmil.models.MILModel` (a DDP wrapper is unwrapped).
        dataset: a sequence / PyG dataset of bags.
        batch_size (int): bags per forward pass (default ``16``; the results do not depend on it).
        device: default: the model's device.
        instances (bool): keep the per-instance arrays (default ``True``; ``False`` keeps only the
            bag-level fields, for large cohorts).
        progress (bool): a tqdm bar over bags (default ``False``).

    Yields:
        :class:`BagPrediction` in dataset order.
    """
    from torch_geometric.loader import DataLoader
    from tqdm.auto import tqdm

    model = getattr(model, "module", model)
    device = _device_of(model) if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(dataset), desc="predict", unit="bag", disable=not progress, leave=False)
    offset = 0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            bags = batch.to_data_list() if instances or hasattr(batch, "slide_id") else None
            batch = batch.to(device)
            out = model(batch)
            B = out.bag_logits.size(0)
            logits = out.bag_logits.float().cpu().numpy()
            probs = probabilities_of(logits)
            idx = (out.batch if out.batch is not None else batch.batch).cpu()
            # split the instance tensors of the batch back into bags (one argsort, no loop over N)
            counts = torch.bincount(idx, minlength=B).tolist()
            order = torch.argsort(idx, stable=True)

            def split(t):
                if t is None:
                    return [None] * B
                t = t.detach().float().cpu()[order].numpy()
                return np.split(t, np.cumsum(counts)[:-1])

            scores = split(out.instance_scores) if instances else [None] * B
            att = split(out.attention) if instances else [None] * B
            y = batch.get("y")
            for j in range(B):
                bag = bags[j] if bags is not None else None
                sid = bag.get("slide_id") if bag is not None else None
                case = bag.get("case_id") if bag is not None else None
                label = None
                if y is not None:
                    yj = y.view(B, -1)[j]
                    label = int(yj[0]) if yj.numel() == 1 else int(yj.argmax())
                rec = BagPrediction(
                    index=offset + j,
                    slide_id=str(sid) if sid is not None else f"bag{offset + j}",
                    case_id=str(case) if case is not None else (str(sid) if sid is not None else f"bag{offset + j}"),
                    label=label, logits=logits[j], probabilities=probs[j],
                )
                if instances and bag is not None:
                    n = int(bag.num_nodes)
                    pos = bag.get("pos")
                    rec.pos = np.array(pos.cpu().numpy()) if pos is not None and pos.size(0) == n else None
                    yi = bag.get("y_inst")
                    rec.y_inst = np.array(yi.cpu().numpy()) if yi is not None and yi.numel() == n else None
                    rec.instance_scores = scores[j]
                    rec.attention = att[j]
                    rec.meta = _scalar_attrs(bag)
                yield rec
            offset += B
            bar.update(B)
    finally:
        bar.close()
        model.train(was_training)


class Evaluation(dict):
    """A ``dict`` of metrics (what :func:`evaluate` returns), with the per-bag records of
    :func:`predict` under ``.predictions`` (a list of :class:`BagPrediction`)."""

    def __init__(self, metrics: Dict[str, float], predictions: List[BagPrediction]):
        super().__init__(metrics)
        self.predictions = predictions


def metrics_from_predictions(records: Sequence[BagPrediction], threshold: float = 0.5,
                             num_outputs: Optional[int] = None) -> Dict[str, float]:
    """The metrics of :func:`evaluate` computed from :func:`predict` records.

    ``loss`` (the unweighted bag task loss on the logits), ``auroc``, ``accuracy``, ``f1``,
    ``precision``, ``recall`` (:func:`graphmil.metrics.bag_metrics`); with instance labels:
    ``instance_auroc``, ``instance_auroc_sm``, ``instance_auroc_per_bag``; with attention:
    ``entropy_mean`` / ``entropy_norm_mean``. Undefined metrics are ``NaN`` with a
    :class:`graphmil.metrics.UndefinedMetricWarning`.
    """
    from graphmil.metrics.bag import bag_metrics
    from graphmil.metrics.instance import attention_entropy_summary, instance_metrics
    from graphmil.models.base import bag_task_loss

    if not records:
        raise ValueError("no bag to evaluate")
    L = np.stack([r.logits for r in records]).astype(np.float32)
    Y = np.asarray([r.label for r in records], dtype=np.int64)
    metrics: Dict[str, float] = {"loss": float(bag_task_loss(torch.from_numpy(L), torch.from_numpy(Y)))}
    P = np.stack([r.probabilities for r in records])
    probs = P[:, 1] if P.shape[1] == 2 else P
    metrics.update(bag_metrics(None, Y, threshold=threshold, probs=probs))
    pred = np.asarray([r.prediction(threshold) for r in records], dtype=np.int64)
    if all(r.score() is not None and r.y_inst is not None for r in records):
        S = np.concatenate([r.score() for r in records])
        YI = np.concatenate([r.y_inst for r in records])
        I = np.repeat(np.arange(len(records)), [r.num_instances for r in records])
        metrics.update(instance_metrics(S, YI, I, pred))
    if all(r.attention is not None for r in records):
        A = np.concatenate([r.attention if r.attention.ndim == 1 else r.attention.mean(axis=1) for r in records])
        I = np.repeat(np.arange(len(records)), [r.attention.shape[0] for r in records])
        e = attention_entropy_summary(A, I, len(records))
        metrics["entropy_mean"] = e["entropy_mean"]
        metrics["entropy_norm_mean"] = e["entropy_norm_mean"]
    return metrics


def evaluate(model: torch.nn.Module, dataset, batch_size: int = 16, device=None,
             threshold: float = 0.5) -> Evaluation:
    """Predict every bag of ``dataset`` (:func:`predict`) and compute the metrics
    (:func:`metrics_from_predictions`).

    Args:
        model: a trained model.
        dataset: bags (each with ``y``).
        batch_size (int): bags per forward pass (default ``16``).
        device: default: the model's device.
        threshold (float): bag decision threshold (default ``0.5``).

    Returns:
        :class:`Evaluation` — a dict of metrics, with the records in ``.predictions``.
    """
    records = list(predict(model, dataset, batch_size=batch_size, device=device))
    if any(r.label is None for r in records):
        raise ValueError("evaluate: every bag needs a label 'y'")
    return Evaluation(metrics_from_predictions(records, threshold), records)

