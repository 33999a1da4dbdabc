r"""A self-contained HTML report of a cross-validation run (``report.html`` in the run directory).

:func:`write_report` reads what ``graphmil train`` wrote — ``config.yaml``, ``cv.json``,
``results.csv``, ``summary.json``, ``predictions.csv``, ``seed<s>_fold<k>/history.csv`` and
``fit.json`` — and writes one HTML file with every image embedded as a base64 PNG and its CSS
inline (no script, nothing fetched: it opens offline and can be mailed):

1. the pooled out-of-fold metrics of every seed with their case-bootstrap 95 % CI, and the
   per-fold test metrics with mean ± std over folds;
2. ROC curves of the pooled out-of-fold test predictions, one per seed (:func:`roc_points`;
   one-vs-rest per class for more than two classes);
3. a reliability diagram (:func:`reliability_bins`: predicted probability vs observed frequency
   in 10 equal-width bins, with the expected calibration error);
4. the confusion matrix of each seed's pooled test predictions (:func:`confusion_counts`);
5. training curves per fold from ``history.csv`` (training / validation loss and the monitored
   validation metric, the kept epoch marked);
6. for a few test slides (:func:`pick_slides`), the heatmap of their fold's own checkpoint
   (re-predicted with :func:`graphmil.train.predict`; over the slide image when ``slides_dir``
   holds it) and the coordinates of the top-scoring tiles;
7. the run's ``config.yaml``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["REPORT_NAME", "GENERATOR", "roc_points", "reliability_bins", "confusion_counts", "pick_slides",
           "OutOfFoldPrediction", "out_of_fold_predictions", "write_report"]

REPORT_NAME = "report.html"
"""File name of the report inside the run directory."""

GENERATOR = "graphmil report"
"""Content of the report's ``<meta name="generator">``: a ``report.html`` without it was not
written by graphmil and is never overwritten."""


# ------------------------------------------------------------------------------------ numbers
def roc_points(y, scores) -> Tuple[np.ndarray, np.ndarray, float]:
    r"""The ROC curve of binary labels and scores, and its area.

    For every distinct threshold :math:`t` (scores sorted decreasing, ties taken together):
    :math:`\mathrm{TPR}(t) = |\{i: s_i \ge t, y_i = 1\}| / P`,
    :math:`\mathrm{FPR}(t) = |\{i: s_i \ge t, y_i = 0\}| / N`, starting at ``(0, 0)``; the area
    is the trapezoidal integral, equal to the Mann–Whitney AUROC (ties count one half).

    Args:
        y: ``[n]`` labels in ``{0, 1}``.
        scores: ``[n]`` scores (higher = more positive).

    Returns:
        ``(fpr, tpr, auc)``; ``auc`` is NaN when one class is missing.

    Shapes:
        - **y, scores:** ``[n]``; **fpr, tpr:** ``[k + 1]`` for ``k`` distinct scores.
    """
    y = np.asarray(y).astype(np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.size != s.size:
        raise ValueError(f"roc_points: {y.size} labels for {s.size} scores")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, dtype=np.int64)
    tp = np.cumsum(y == 1)[last] if s.size else np.zeros(0)
    fp = np.cumsum(y == 0)[last] if s.size else np.zeros(0)
    P, N = int((y == 1).sum()), int((y == 0).sum())
    tpr = np.r_[0.0, tp / P] if P else np.r_[0.0, np.zeros(len(last))]
    fpr = np.r_[0.0, fp / N] if N else np.r_[0.0, np.zeros(len(last))]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0)) if P and N else float("nan")
    return fpr, tpr, auc


def reliability_bins(y, probs, bins: int = 10) -> Dict[str, np.ndarray]:
    r"""Reliability diagram of binary outcomes: ``bins`` equal-width bins of the predicted
    probability, :math:`[0, \tfrac1B], (\tfrac1B, \tfrac2B], \dots, (\tfrac{B-1}B, 1]` (scikit-learn's
    ``calibration_curve`` convention), with in each bin the mean predicted probability, the
    observed frequency of ``y = 1`` and the count.

    .. math::
        \mathrm{ECE} = \sum_b \frac{n_b}{n}\,\bigl|\bar y_b - \bar p_b\bigr|

    Args:
        y: ``[n]`` outcomes in ``{0, 1}`` (e.g. "label is the positive class", or "prediction
            was right" for confidences).
        probs: ``[n]`` predicted probabilities in ``[0, 1]``.
        bins (int): number of bins (default ``10``).

    Returns:
        ``{"mean_predicted", "observed", "count"}`` (``[bins]``, NaN in empty bins), ``"edges"``
        (``[bins + 1]``) and ``"ece"`` (a 0-d array).
    """
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if y.size != p.size:
        raise ValueError(f"reliability_bins: {y.size} outcomes for {p.size} probabilities")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("reliability_bins: 'probs' must be in [0, 1]")
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    b = np.searchsorted(edges[1:-1], p, side="left")
    count = np.bincount(b, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mp = np.bincount(b, weights=p, minlength=bins) / count
        ob = np.bincount(b, weights=y, minlength=bins) / count
    ece = float(np.nansum(count / max(p.size, 1) * np.abs(ob - mp))) if p.size else float("nan")
    return {"mean_predicted": mp, "observed": ob, "count": count, "edges": edges, "ece": np.asarray(ece)}


def confusion_counts(labels: Sequence[str], predictions: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Confusion matrix ``M[i, j]`` = number of slides with true class ``class_names[i]``
    predicted as ``class_names[j]``.

    Args:
        labels: true class names per slide.
        predictions: predicted class names per slide.
        class_names: the classes, in order.

    Returns:
        ``[C, C]`` int64.

    Raises:
        ValueError: naming a label or prediction not in ``class_names``.
    """
    index = {str(c): i for i, c in enumerate(class_names)}
    m = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    for a, b in zip(labels, predictions):
        for v in (a, b):
            if str(v) not in index:
                raise ValueError(f"confusion_counts: class '{v}' is not one of {list(class_names)}")
        m[index[str(a)], index[str(b)]] += 1
    return m


def _positive_probs(rows, class_names) -> Tuple[np.ndarray, np.ndarray]:
    """(y [n] class index, P [n, C]) of predictions.csv rows."""
    index = {c: i for i, c in enumerate(class_names)}
    y = np.asarray([index[str(r["label"])] for r in rows], dtype=np.int64)
    P = np.asarray([[float(r[f"prob_{c}"]) for c in class_names] for r in rows], dtype=np.float64)
    return y, P


def pick_slides(rows: Sequence[Dict[str, str]], class_names: Sequence[str], n: int = 3) -> List[Tuple[str, str]]:
    r"""Choose ``n`` test slides worth looking at, from ``predictions.csv`` rows of one seed.

    With :math:`q` = the positive-class probability and confidence :math:`|q - 0.5|` (two
    classes), or :math:`q` = confidence = the predicted class's probability (more): the most
    confident correct prediction (largest :math:`q`; for two classes a true positive), the most
    confident error (largest confidence among wrong predictions), the least confident slide
    (smallest confidence), then the rest by decreasing :math:`q`; each slide once.

    Args:
        rows: ``predictions.csv`` rows (``split == "test"`` ones are used).
        class_names: the classes (``prob_<class>`` columns).
        n (int): how many (default ``3``).

    Returns:
        ``[(slide_id, why), ...]``, at most ``n``.
    """
    test = [r for r in rows if r.get("split") == "test"]
    if not test or n < 1:
        return []
    y, P = _positive_probs(test, class_names)
    binary = P.shape[1] == 2
    pred = np.asarray([list(class_names).index(str(r["prediction"])) for r in test])
    q = P[:, 1] if binary else P[np.arange(len(test)), pred]
    right = y == pred
    chosen: List[Tuple[str, str]] = []

    def take(i, why):
        sid = test[int(i)]["slide_id"]
        if len(chosen) < n and all(s != sid for s, _ in chosen):
            chosen.append((sid, why))

    pos_name = class_names[1] if binary else None
    good = np.flatnonzero(right & (y == 1)) if binary else np.flatnonzero(right)
    if good.size:
        take(good[np.argmax(q[good])], f"most confident true positive ({pos_name})" if binary else "most confident correct")
    conf = np.abs(q - 0.5) if binary else q  # distance from the decision / the top probability
    bad = np.flatnonzero(~right)
    if bad.size:
        take(bad[np.argmax(conf[bad])], "most confident error")
    take(int(np.argmin(conf)), "least confident")
    for i in np.argsort(-q, kind="mergesort"):
        take(i, "next by probability")
    return chosen


# ------------------------------------------------------------------------------------ records
@dataclass
class OutOfFoldPrediction:
    """One slide predicted by the fold that held it out (what :func:`out_of_fold_predictions`
    yields): the :class:`graphmil.train.BagPrediction` ``record``, its ``seed`` and ``fold``, the
    ``checkpoint`` used and the ``model_name``."""

    record: Any
    seed: int
    fold: int
    checkpoint: str
    model_name: str


def out_of_fold_predictions(run_dir: str, dataset=None, seed: Optional[int] = None,
                            slide_ids: Optional[Sequence[str]] = None,
                            batch_size: int = 16) -> Iterator[OutOfFoldPrediction]:
    """Predict each test slide of a run with the checkpoint of the fold that held it out.

    The test fold of every slide comes from ``splits.csv``; the checkpoint is the fold's kept one
    (:func:`graphmil.train.fold_checkpoint`). Every checkpoint is checked readable before any
    prediction.

    Args:
        run_dir (str): a run directory of ``graphmil train``.
        dataset (optional): the bags (default: rebuilt from the run's ``config.yaml``).
        seed (int, optional): the seed whose folds are used (default: the first of ``splits.csv``).
        slide_ids (list of str, optional): only these slides (default: every test slide).
        batch_size (int): bags per forward pass (default ``16``).

    Yields:
        :class:`OutOfFoldPrediction`, fold by fold.

    Raises:
        ValueError: naming the file or slide: no ``splits.csv``, a seed not in it, a slide that is
            not a test slide of that seed, an unreadable checkpoint.
    """
    from graphmil.train.checkpoint import load_checkpoint
    from graphmil.train.cv import run_folds
    from graphmil.train.data import subset
    from graphmil.train.inference import predict

    splits_csv = os.path.join(run_dir, "splits.csv")
    dataset, meta, plans, ckpts = run_folds(run_dir, dataset)
    seeds = list(dict.fromkeys(p.seed for p in plans))
    use = seeds[0] if seed is None else int(seed)
    if use not in seeds:
        raise ValueError(f"{splits_csv}: seed {use} is not in the run (seeds: {', '.join(map(str, seeds))})")
    plans = [p for p in plans if p.seed == use]
    want = None
    if slide_ids is not None:
        want = {str(s) for s in slide_ids}
        tested = {meta.slide_ids[i] for p in plans for i in p.test}
        missing = sorted(want - tested)
        if missing:
            raise ValueError(f"{splits_csv}: slide(s) {', '.join(missing[:5])} are not test slides of seed {use}")
    for p in plans:
        idx = [i for i in p.test if want is None or meta.slide_ids[i] in want]
        if not idx:
            continue
        model, ck = load_checkpoint(ckpts[p.name])
        name = str((ck.get("model_spec") or {}).get("name", type(model).__name__))
        for r in predict(model, subset(dataset, idx), batch_size=batch_size):
            yield OutOfFoldPrediction(r, p.seed, p.fold, ckpts[p.name], name)


# ------------------------------------------------------------------------------------ drawing
def _png(fig, dpi: int = 100) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _roc_figure(by_seed, class_names) -> Tuple[str, Dict[str, float]]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    aucs = {}
    for seed, rows in by_seed.items():
        y, P = _positive_probs(rows, class_names)
        targets = [1] if P.shape[1] == 2 else list(range(P.shape[1]))
        for c in targets:
            fpr, tpr, auc = roc_points(y == c, P[:, c])
            key = f"seed {seed}" if len(targets) == 1 else f"seed {seed}, {class_names[c]} vs rest"
            aucs[key] = auc
            ax.step(fpr, tpr, where="post", lw=1.6, label=f"{key} (AUC {auc:.3f}, n={len(rows)})")
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_title("ROC, pooled out-of-fold test predictions", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig), aucs


def _calibration_figure(by_seed, class_names) -> Tuple[str, Dict[str, float]]:
    plt = _plt()
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(4.6, 5.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    eces = {}
    binary = len(class_names) == 2
    for seed, rows in by_seed.items():
        y, P = _positive_probs(rows, class_names)
        if binary:
            p, o = P[:, 1], (y == 1)
        else:
            pred = P.argmax(axis=1)
            p, o = P.max(axis=1), (pred == y)
        rb = reliability_bins(o, p)
        eces[f"seed {seed}"] = float(rb["ece"])
        ok = rb["count"] > 0
        ax.plot(rb["mean_predicted"][ok], rb["observed"][ok], marker="o", lw=1.4,
                label=f"seed {seed} (ECE {float(rb['ece']):.3f})")
        centres = (rb["edges"][:-1] + rb["edges"][1:]) / 2
        axh.bar(centres, rb["count"], width=0.09, alpha=0.6, label=f"seed {seed}")
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1, label="perfect calibration")
    ax.set_ylabel(f"fraction labelled {class_names[1]}" if binary else "observed accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Reliability (10 equal-width bins)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    axh.set_xlabel(f"predicted p({class_names[1]})" if binary else "confidence (max class probability)")
    axh.set_ylabel("slides")
    axh.set_xlim(0, 1)
    return _png(fig), eces


def _history_figure(run_dir: str, fold_names: Sequence[str]) -> Optional[str]:
    plt = _plt()
    hists = []
    for name in fold_names:
        path = os.path.join(run_dir, name, "history.csv")
        if not os.path.isfile(path):
            continue
        rows = _read_csv(path)
        fit = {}
        fj = os.path.join(run_dir, name, "fit.json")
        if os.path.isfile(fj):
            with open(fj) as f:
                fit = json.load(f)
        hists.append((name, rows, fit))
    if not hists:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    cmap = plt.get_cmap("tab10")
    monitor = None
    for k, (name, rows, fit) in enumerate(hists):
        col = cmap(k % 10)
        ep = np.asarray([_f(r.get("epoch")) for r in rows]) + 1
        for key, ls in (("train_loss", "-"), ("val_loss", "--")):
            v = np.asarray([_f(r.get(key)) for r in rows])
            if np.isfinite(v).any():
                a1.plot(ep, v, ls=ls, c=col, lw=1.3, label=f"{name} {key.split('_')[0]}")
        mon = fit.get("monitor") or "auroc"
        monitor = monitor or mon
        v = np.asarray([_f(r.get(f"val_{mon}")) for r in rows])
        if np.isfinite(v).any():
            a2.plot(ep, v, c=col, lw=1.3, label=name)
            be = fit.get("best_epoch")
            if isinstance(be, int) and 0 <= be < len(v) and fit.get("restored") == "best":
                a2.plot([be + 1], [v[be]], marker="*", ms=10, c=col)
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.set_title("loss (solid: train, dashed: validation)", fontsize=10)
    a2.set_xlabel("epoch")
    a2.set_ylabel(f"validation {monitor}")
    a2.set_title(f"validation {monitor} (★ kept epoch)", fontsize=10)
    for a in (a1, a2):
        if a.lines:
            a.legend(fontsize=6, ncol=2)
    return _png(fig)


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------ HTML
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1100px;
padding:1.2em 1.6em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}h3{font-size:1em;margin:.8em 0 .3em}
.muted{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.4em 0 .8em;font-size:.85em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.figs img{max-width:100%;height:auto;border:1px solid #eee}
.slide{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start;margin-bottom:1em}
.slide img{max-width:480px;width:100%;height:auto;border:1px solid #eee}
pre{background:#f7f7f7;border:1px solid #e4e4e4;padding:.7em;font-size:.8em;overflow-x:auto}
.cm td.hit{background:#e3f1e3}.cm td.miss{background:#f8e3e3}
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _fmt(v: Any, nd: int = 4) -> str:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    x = _f(v)
    if math.isnan(x):
        return "–" if v in (None, "") else _esc(v)
    return f"{x:.{nd}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    out = [f"<table{c}><thead><tr>"]
    out += [f'<th class="l">{_esc(h)}</th>' if i < left else f"<th>{_esc(h)}</th>" for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="l">{v}</td>' if i < left else f"<td>{v}</td>"
                                    for i, v in enumerate(r)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


_FOLD_COLS = ("auroc", "accuracy", "balanced_accuracy", "f1", "precision", "recall", "loss", "instance_auroc")


def _check_target(path: str) -> None:
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                head = f.read(4096)
        except OSError as e:
            raise ValueError(f"cannot read '{path}': {e}") from None
        if f'<meta name="generator" content="{GENERATOR}">' not in head:
            raise ValueError(f"'{path}' exists and was not written by graphmil; move it away (graphmil only "
                             "overwrites its own report)")


def write_report(run_dir: str, dataset=None, num_slides: int = 3, top_tiles: int = 5,
                 slides_dir: Optional[str] = None, width: int = 1200, seed: Optional[int] = None,
                 batch_size: int = 16, path: Optional[str] = None) -> str:
    """Write ``report.html`` into a finished run directory (the sections are listed in the module
    docstring). Every image is an embedded base64 PNG and the CSS is inline: the file needs
    nothing else to open, offline.

    Only a ``report.html`` that graphmil wrote (its ``<meta name="generator">`` is
    :data:`GENERATOR`) is replaced; no other file of the run is touched. The heatmaps need the
    bags: ``dataset``, or the run's ``config.yaml`` to rebuild them; when neither works the report
    says why and leaves them out.

    Args:
        run_dir (str): a finished ``graphmil train`` run (``summary.json``, ``predictions.csv``,
            ``splits.csv``).
        dataset (optional): the run's bags (default ``None``: rebuilt from ``config.yaml``).
        num_slides (int): test slides shown with a heatmap (default ``3``, :func:`pick_slides`;
            ``0``: none).
        top_tiles (int): top-scoring tiles listed per slide (default ``5``).
        slides_dir (str, optional): folder of whole-slide images ``<slide_id>.<ext>``: heatmaps are
            drawn over them when present (:func:`graphmil.viz.overlay_heatmap`; default ``None``).
        width (int): thumbnail width for those (default ``1200``).
        seed (int, optional): the seed whose slides are shown (default: the first).
        batch_size (int): bags per forward pass (default ``16``).
        path (str, optional): where to write (default ``<run_dir>/report.html``).

    Returns:
        The path written.

    Raises:
        ValueError: naming the file: not a finished run (no ``summary.json`` /
            ``predictions.csv``), an existing ``report.html`` graphmil did not write.
    """
    for need in ("summary.json", "predictions.csv", "splits.csv"):
        if not os.path.isfile(os.path.join(run_dir, need)):
            raise ValueError(f"'{run_dir}' has no {need}: not a finished graphmil train run")
    target = path or os.path.join(run_dir, REPORT_NAME)
    _check_target(target)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    cv = {}
    if os.path.isfile(os.path.join(run_dir, "cv.json")):
        with open(os.path.join(run_dir, "cv.json")) as f:
            cv = json.load(f)
    class_names = [str(c) for c in (summary.get("class_names") or cv.get("class_names") or ["0", "1"])]
    model = summary.get("model") or cv.get("model") or {}
    preds = _read_csv(os.path.join(run_dir, "predictions.csv"))
    test = [r for r in preds if r.get("split") == "test"]
    seeds = list(dict.fromkeys(str(r["seed"]) for r in test))
    by_seed = {s: [r for r in test if str(r["seed"]) == s] for s in seeds}
    results = _read_csv(os.path.join(run_dir, "results.csv")) if os.path.isfile(os.path.join(run_dir, "results.csv")) else []
    config_text = ""
    if os.path.isfile(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as f:
            config_text = f.read()
    data_desc = ""
    try:
        import yaml

        d = (yaml.safe_load(config_text) or {}).get("data", {}) if config_text else {}
        data_desc = d.get("dataset", "") + (f" ({d.get('root')})" if d.get("root") else "")
    except Exception:  # pragma: no cover - config.yaml is graphmil's own
        pass

    parts: List[str] = []
    name = os.path.basename(os.path.abspath(run_dir))
    n_slides = len({r["slide_id"] for r in test})
    parts.append(f"<h1>Run report: {_esc(name)}</h1>")
    parts.append(f'<p class="muted">model <b>{_esc(model.get("name", "?"))}</b> '
                 f'{_esc(json.dumps(model.get("kwargs", {})))}; data {_esc(data_desc or "?")}; '
                 f'{_esc(summary.get("folds", "?"))} fold(s) × seed(s) {_esc(", ".join(seeds) or "–")}; '
                 f'{n_slides} test slide(s); classes {_esc(", ".join(class_names))}. '
                 f'Run directory <code>{_esc(os.path.abspath(run_dir))}</code>.</p>')

    # ---- metrics
    parts.append('<section id="metrics"><h2>Metrics</h2>')
    pooled = summary.get("pooled_out_of_fold") or {}
    if pooled:
        parts.append("<h3>Pooled out-of-fold test predictions (95 % CI, case-level bootstrap)</h3>")
        metrics = list(dict.fromkeys(k for pm in pooled.values() for k in pm))
        rows = [[_esc(m)] + [f"{_fmt(pm[m]['value'])} [{_fmt(pm[m]['low'])}, {_fmt(pm[m]['high'])}]"
                             if m in pm else "–" for pm in pooled.values()] for m in metrics]
        parts.append(_table(["metric"] + [f"seed {s}" for s in pooled], rows))
    if results:
        parts.append("<h3>Per fold (test slides of each fold)</h3>")
        cols = [c for c in _FOLD_COLS if any(c in r for r in results)]
        rows = [[_esc(r.get("seed")), _esc(r.get("fold")), _esc(r.get("best_epoch", "")),
                 _esc(r.get("epochs_run", ""))] + [_fmt(r.get(c)) for c in cols] for r in results]
        summ = summary.get("summary") or {}
        rows.append(["<b>mean ± std</b>", "", "", ""] +
                    [f"<b>{_fmt(summ[c]['mean'])} ± {_fmt(summ[c]['std'])}</b>" if c in summ else "–" for c in cols])
        parts.append(_table(["seed", "fold", "kept epoch", "epochs"] + cols, rows, left=1))
    parts.append("</section>")

    # ---- ROC, calibration
    if by_seed:
        roc_b64, aucs = _roc_figure(by_seed, class_names)
        cal_b64, eces = _calibration_figure(by_seed, class_names)
        parts.append('<section id="roc"><h2>ROC and calibration</h2><div class="figs">')
        parts.append(_img(roc_b64, "ROC curves of the pooled out-of-fold predictions"))
        parts.append(_img(cal_b64, "reliability diagram"))
        parts.append("</div>")
        parts.append('<p class="muted">' + "; ".join(f"{_esc(k)}: AUC {_fmt(v, 3)}" for k, v in aucs.items()) +
                     ". " + "; ".join(f"{_esc(k)}: ECE {_fmt(v, 3)}" for k, v in eces.items()) + ".</p></section>")

        # ---- confusion matrices
        parts.append('<section id="confusion"><h2>Confusion matrix (pooled test predictions)</h2><div class="figs">')
        for s, rows in by_seed.items():
            m = confusion_counts([r["label"] for r in rows], [r["prediction"] for r in rows], class_names)
            tbl = _confusion_table(m, class_names)
            parts.append(f'<div><h3>seed {_esc(s)} ({len(rows)} slides)</h3>{tbl}</div>')
        parts.append("</div></section>")

    # ---- training curves
    folds = [f"seed{r.get('seed')}_fold{r.get('fold')}" for r in results] or sorted(
        d for d in os.listdir(run_dir) if d.startswith("seed") and os.path.isdir(os.path.join(run_dir, d)))
    hist_b64 = _history_figure(run_dir, folds)
    if hist_b64:
        parts.append('<section id="training"><h2>Training curves</h2>')
        parts.append(_img(hist_b64, "training curves per fold") + "</section>")

    # ---- example slides
    if num_slides > 0 and by_seed:
        parts.append('<section id="slides"><h2>Example test slides</h2>')
        parts.append(_slides_section(run_dir, dataset, by_seed, seeds, class_names, num_slides, top_tiles,
                                     slides_dir, width, seed, batch_size))
        parts.append("</section>")

    # ---- config
    if config_text:
        parts.append(f'<section id="config"><h2>Configuration (config.yaml)</h2><pre>{_esc(config_text)}</pre></section>')
    files = sorted(f for f in os.listdir(run_dir) if f != REPORT_NAME)
    parts.append(f'<p class="muted">Files of the run: {", ".join(f"<code>{_esc(f)}</code>" for f in files)}. '
                 f"Rebuild this page with <code>graphmil report {_esc(run_dir)}</code>.</p>")

    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f'<meta name="generator" content="{GENERATOR}">'
           '<meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<title>graphmil run report: {_esc(name)}</title><style>{_CSS}</style></head><body>\n"
           + "\n".join(parts) + "\n</body></html>\n")
    d = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(doc)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600: give it the usual permissions
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return target


def _confusion_table(m: np.ndarray, class_names: Sequence[str]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in class_names)
    rows = []
    for i, c in enumerate(class_names):
        cells = "".join(f'<td class="{"hit" if i == j else "miss"}" data-count="{int(m[i, j])}">{int(m[i, j])}</td>'
                        for j in range(len(class_names)))
        rows.append(f'<tr><th class="l">{_esc(c)}</th>{cells}</tr>')
    return (f'<table class="cm"><thead><tr><th class="l">true \\ predicted</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _slides_section(run_dir, dataset, by_seed, seeds, class_names, num_slides, top_tiles, slides_dir, width,
                    seed, batch_size) -> str:
    from graphmil.io.geojson import tile_values
    from graphmil.train.cv import run_dataset

    s = str(seed) if seed is not None else seeds[0]
    if s not in by_seed:
        return f'<p class="muted">Seed {_esc(s)} has no test predictions.</p>'
    picks = pick_slides(by_seed[s], class_names, num_slides)
    why = dict(picks)
    try:
        if dataset is None:
            dataset = run_dataset(run_dir)
        oof = list(out_of_fold_predictions(run_dir, dataset, seed=int(s), slide_ids=[p for p, _ in picks],
                                           batch_size=batch_size))
    except Exception as e:  # the report stays useful without the bags
        return (f'<p class="muted">Heatmaps left out: the bags could not be re-predicted '
                f'({_esc(type(e).__name__)}: {_esc(e)}).</p>')
    order = {p: k for k, (p, _) in enumerate(picks)}
    oof.sort(key=lambda o: order.get(o.record.slide_id, 1 << 30))
    out = [f'<p class="muted">Seed {_esc(s)}: each slide re-predicted by the checkpoint of the fold that held '
           "it out; colours: instance score, per-slide min–max.</p>"]
    with tempfile.TemporaryDirectory() as tmp:
        for o in oof:
            r = o.record
            head = (f"<h3>{_esc(r.slide_id)} — {_esc(why.get(r.slide_id, ''))} (fold {o.fold}, "
                    f"<code>{_esc(os.path.relpath(o.checkpoint, run_dir))}</code>)</h3>")
            if r.pos is None or r.instance_scores is None:
                out.append(head + '<p class="muted">no positions or instance scores to draw.</p>')
                continue
            png = os.path.join(tmp, f"{len(out)}.png")
            note = ""
            try:
                drawn = False
                if slides_dir:
                    from graphmil.viz.overlay import find_slide, overlay_heatmap

                    sp = find_slide(slides_dir, r.slide_id)
                    if sp is not None:
                        overlay_heatmap(r, sp, png, width=width, class_names=class_names, dpi=90)
                        drawn, note = True, f" over {_esc(os.path.basename(sp))}"
                if not drawn:
                    from graphmil.viz.heatmap import heatmap_of_prediction

                    heatmap_of_prediction(r, png, class_names=class_names, dpi=80)
                with open(png, "rb") as f:
                    img = _img(base64.b64encode(f.read()).decode("ascii"), f"heatmap of {r.slide_id}{note}")
            except ValueError as e:
                img = f'<p class="muted">heatmap not drawn: {_esc(e)}</p>'
            v = tile_values(r, "score")
            k = min(int(top_tiles), v.size)
            top = np.lexsort((np.arange(v.size), -v))[:k]
            att = None
            if r.attention is not None:
                try:
                    att = tile_values(r, "attention_x_n")
                except ValueError:
                    att = None
            ps = r.meta.get("patch_size_level0")
            rows = [[str(j + 1), _fmt(int(r.pos[i, 0])), _fmt(int(r.pos[i, 1])), _fmt(v[i]),
                     _fmt(att[i], 3) if att is not None else "–"] for j, i in enumerate(top)]
            tbl = _table(["rank", "x (level 0)", "y (level 0)", "score", "attention × N"], rows)
            out.append(head + f'<div class="slide" data-slide="{_esc(r.slide_id)}" data-fold="{o.fold}">{img}<div><p class="muted">top {k} of {v.size} tiles; (x, y) '
                       f"= top-left corner in level-0 px{f', tile {_fmt(ps, 0)} px' if ps else ''}</p>{tbl}</div></div>")
    return "\n".join(out)
