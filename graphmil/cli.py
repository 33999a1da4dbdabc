"""The ``graphmil`` command: ``demo``, ``train``, ``eval``, ``heatmap``, ``info``, ``models``.

Every sub-command checks its inputs (config keys, model name, labels vs slides, output folder)
*before* writing anything; a bad input prints ``graphmil: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _require_new(path: Optional[str], what: str = "output directory") -> None:
    if path is not None and os.path.exists(path):
        raise CLIError(f"{what} '{path}' already exists; choose a new one (graphmil never overwrites)")


def _free_dir(root: str, name: str) -> str:
    for k in range(10000):
        cand = os.path.join(root, name if k == 0 else f"{name}-{k}")
        if not os.path.exists(cand):
            return cand
    raise CLIError(f"no free run directory name under '{root}'")


def _dataset_from_args(args):
    from graphmil.train.config import DataConfig
    from graphmil.train.engine import build_dataset

    if args.folder:
        if not args.labels:
            raise CLIError("--folder needs --labels (a CSV/TSV with slide_id and label columns)")
        kw = json.loads(args.dataset_kwargs) if getattr(args, "dataset_kwargs", None) else {}
        cfg = DataConfig(dataset="folder", root=args.folder, labels=args.labels, kwargs=kw)
    elif args.dataset:
        kw = json.loads(args.dataset_kwargs) if getattr(args, "dataset_kwargs", None) else {}
        cfg = DataConfig(dataset=args.dataset, root=args.root, kwargs=kw)
    else:
        raise CLIError("give a data source: --dataset NAME or --folder DIR --labels FILE")
    return build_dataset(cfg)


# ------------------------------------------------------------------------------------ commands
def cmd_models(args) -> int:
    from graphmil.models import list_models
    from graphmil.models.registry import _REGISTRY

    for name in list_models():
        para = " ".join((_REGISTRY[name].__doc__ or "").strip().split("\n\n")[0].split())
        if len(para) > 100:
            para = para[:97] + "..."
        print(f"{name:<10} {para}")
    return 0


def cmd_demo(args) -> int:
    from graphmil.demo import format_table, run_demo

    _require_new(args.out, "run directory")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    res = run_demo(out=args.out, quick=args.quick, seed=args.seed,
                   models=args.models.split(",") if args.models else None, epochs=args.epochs,
                   progress=not args.no_progress)
    print()
    print(format_table(res["rows"]))
    total = sum(r.get("time_s", 0.0) for r in res["rows"])
    print(f"\ntotal training time {total:.1f} s")
    print(f"results:  {os.path.join(res['run_dir'], 'results.csv')}")
    print(f"heatmaps: {os.path.join(res['run_dir'], 'heatmaps')}/ "
          f"({', '.join(os.path.basename(p) for p in res['heatmaps'].values())})")
    return 0


def cmd_train(args) -> int:
    from graphmil.models import list_models
    from graphmil.train.config import dump_config, load_config
    from graphmil.train.engine import build_dataset, cross_validate

    cfg = load_config(args.config)
    if args.out:
        cfg.out = args.out
    if cfg.model.name.lower() not in list_models():
        import difflib
        close = difflib.get_close_matches(cfg.model.name.lower(), list_models(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise CLIError(f"{args.config}: unknown model '{cfg.model.name}'.{hint} "
                       f"Known models: {', '.join(list_models())}")
    out = cfg.out or _free_dir("runs", cfg.name)
    _require_new(out, "run directory")
    from graphmil.train.distributed import init_distributed, is_main_process
    init_distributed()  # under torchrun (WORLD_SIZE > 1): DDP + DistributedSampler in the engine
    dataset = build_dataset(cfg.data)  # labels vs slides are checked here, before any write
    res = cross_validate(dataset, cfg.model.name, cfg.model.kwargs, cfg.train, folds=cfg.cv.folds,
                         seeds=cfg.cv.seeds, val_fraction=cfg.cv.val_fraction,
                         test_fraction=cfg.cv.test_fraction, num_classes=cfg.data.num_classes,
                         out_dir=out)
    if is_main_process():
        cfg.out = out
        dump_config(cfg, os.path.join(out, "config.yaml"))
        print(res.table())
        print(f"run directory: {out} (results.csv, summary.json, seed<s>_fold<k>/checkpoints)")
    return 0


def cmd_eval(args) -> int:
    from graphmil.train.engine import evaluate, load_checkpoint

    _require_new(args.out)
    model, ckpt = load_checkpoint(args.checkpoint)
    dataset = _dataset_from_args(args)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ev = evaluate(model, dataset, batch_size=args.batch_size)
    for k, v in ev.items():
        print(f"{k:<24} {v:.4f}")
    if args.out:
        os.makedirs(args.out)
        with open(os.path.join(args.out, "metrics.json"), "x") as f:
            json.dump(dict(ev), f, indent=2)
        p = ev.predictions
        import csv
        with open(os.path.join(args.out, "bags.csv"), "x", newline="") as f:
            w = csv.writer(f)
            w.writerow(["slide_id", "label", "prob", "pred"])
            for i in range(len(p["bag_label"])):
                prob = p["bag_prob"][i]
                w.writerow([p["slide_id"][i], int(p["bag_label"][i]),
                            float(prob) if getattr(prob, "ndim", 0) == 0 else list(map(float, prob)),
                            int(p["bag_pred"][i])])
        if args.scores:
            _export_scores(dataset, ev, os.path.join(args.out, "scores"))
        print(f"written: {args.out}")
    return 0


def _export_scores(dataset, ev, folder: str) -> List[str]:
    from graphmil.io import write_scores

    p = ev.predictions
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(len(dataset)):
        m = p["instance_bag"] == i
        bag = dataset[i]
        if bag.get("pos") is None or p["instance_score"] is None:
            continue
        scores = {"score": p["instance_score"][m]}
        if p["attention"] is not None:
            scores["attention"] = p["attention"][m]
        name = str(p["slide_id"][i] if p["slide_id"][i] is not None else f"bag{i}")
        paths.append(str(write_scores(os.path.join(folder, f"{name}.h5"), bag, **scores)))
    return paths


def cmd_heatmap(args) -> int:
    from graphmil.train.engine import evaluate, load_checkpoint, subset
    from graphmil.viz.heatmap import plot_heatmap

    out = args.out or _free_dir("runs", "heatmaps")
    _require_new(out)
    model, _ = load_checkpoint(args.checkpoint)
    dataset = _dataset_from_args(args)
    ids = [getattr(dataset[i], "slide_id", None) for i in range(len(dataset))] if args.bag else None
    if args.bag:
        idx = []
        for b in args.bag:
            if b in ids:
                idx.append(ids.index(b))
            elif b.isdigit() and int(b) < len(dataset):
                idx.append(int(b))
            else:
                raise CLIError(f"--bag '{b}' is neither a slide id nor an index below {len(dataset)}")
    else:
        idx = [next((i for i in range(len(dataset)) if int(dataset[i].y.view(-1)[0]) == 1), 0)]
    sub = subset(dataset, idx)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ev = evaluate(model, sub)
    p = ev.predictions
    if p["instance_score"] is None:
        raise CLIError("the model returns no instance scores")
    os.makedirs(out)
    for j, i in enumerate(idx):
        bag = sub[j]
        m = p["instance_bag"] == j
        image = dataset.image(i) if hasattr(dataset, "image") else None
        ps = bag.get("patch_size_level0")
        ps = float(ps) if ps is not None and image is None else None
        name = str(p["slide_id"][j] if p["slide_id"][j] is not None else f"bag{i}")
        path = plot_heatmap(bag.pos, p["instance_score"][m], os.path.join(out, f"{name}.png"),
                            image=image, patch_size=ps, labels=bag.get("y_inst"),
                            title=f"{name}: label {int(bag.y.view(-1)[0])}, p = {float(p['bag_prob'][j]):.2f}")
        print(path)
    if args.scores:
        for path in _export_scores(sub, ev, out):
            print(path)
    return 0


def cmd_info(args) -> int:
    from graphmil.io import scan

    if not os.path.isdir(args.folder):
        raise CLIError(f"'{args.folder}' is not a folder")
    info = scan(args.folder, encoder=args.encoder, on_error="warn")
    print(info.summary())
    if len(info):
        bag = info.read(0)
        pos = bag.get("pos")
        step = bag.get("step_level0")
        ps = bag.get("patch_size_level0")
        if pos is not None and pos.size(0) > 1:
            from graphmil.transforms.graph import infer_grid_step

            inferred = infer_grid_step(pos)
            spacing = float("nan") if inferred is None else float(inferred)
            print(f"coords:       grid step {spacing:g} px (most common nearest-neighbour offset, "
                  f"slide '{info.slides[0].slide_id}'), step attr {step if step is not None else '-'}, "
                  f"patch size {ps if ps is not None else '-'}")
            if step is not None and inferred is not None and abs(float(step) - spacing) > 0.01 * spacing:
                print(f"warning:      the step attribute ({step}) differs from the coordinate spacing "
                      f"({spacing:g}); graphmil trusts the coordinates")
    for e in info.errors:
        print(f"unreadable:   {e}")
    return 0


# -------------------------------------------------------------------------------------- parser
def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (one of)")
    g.add_argument("--dataset", help="named dataset: synthetic, musk1, musk2, ucsb_breast, colon_cancer")
    g.add_argument("--root", help="data folder of a named dataset (default $GRAPHMIL_DATA or ../shared/data)")
    g.add_argument("--dataset-kwargs", help="JSON of dataset arguments, e.g. '{\"num_bags\": 32}'")
    g.add_argument("--folder", help="a CLAM / TRIDENT / graphmil feature folder")
    g.add_argument("--labels", help="labels CSV/TSV for --folder (slide_id, label)")


def build_parser() -> argparse.ArgumentParser:
    """The ``graphmil`` argument parser."""
    import graphmil

    parser = argparse.ArgumentParser(
        prog="graphmil",
        description="Multiple-instance learning on whole-slide images as PyTorch Geometric graphs.")
    parser.add_argument("--version", action="version", version=f"graphmil {graphmil.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train ABMIL, ABMIL+AEM, SmAP, CASii, AINet on synthetic bags",
                       description="Train ABMIL, ABMIL+AEM, SmAP, CASii and AINet on synthetic spatial "
                                   "bags (no download), print bag/instance AUROC and time per model, "
                                   "and write one heatmap per model into a new run directory.")
    p.add_argument("--quick", action="store_true", help="10 epochs instead of 20 (about 2x faster)")
    p.add_argument("--out", help="run directory to create (must not exist; default runs/demo[-N])")
    p.add_argument("--seed", type=int, default=0, help="seed of data and training (default 0)")
    p.add_argument("--epochs", type=int, help="epochs per model (default 20, 10 with --quick)")
    p.add_argument("--models", help="comma-separated subset, e.g. ABMIL,SmAP")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train / cross-validate from a YAML config",
                       description="Train and evaluate a model from a YAML config (sections model, "
                                   "data, train, cv; see docs/training.md). Writes a new run directory "
                                   "with results.csv, summary.json and checkpoints.")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--out", help="run directory to create (overrides the config's 'out'; must not exist)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset or a feature folder",
                       description="Evaluate a checkpoint (written by graphmil train) on a named "
                                   "dataset or a feature folder with labels; prints the metrics.")
    p.add_argument("--checkpoint", required=True, help="a best.pt / last.pt checkpoint")
    _add_data_args(p)
    p.add_argument("--out", help="new folder for metrics.json, bags.csv (and scores/ with --scores)")
    p.add_argument("--scores", action="store_true", help="also export per-instance scores as h5")
    p.add_argument("--batch-size", type=int, default=16, help="bags per forward pass (default 16)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("heatmap", help="draw instance-score heatmaps of some bags",
                       description="Draw the instance scores of a checkpoint over the coordinates of "
                                   "some bags (over the H&E image for colon_cancer) as PNGs.")
    p.add_argument("--checkpoint", required=True, help="a best.pt / last.pt checkpoint")
    _add_data_args(p)
    p.add_argument("--bag", action="append", help="slide id or index (repeatable; default: first positive bag)")
    p.add_argument("--out", help="new folder for the PNGs (default runs/heatmaps[-N])")
    p.add_argument("--scores", action="store_true", help="also export the scores as h5 (write_scores)")
    p.set_defaults(func=cmd_heatmap)

    p = sub.add_parser("info", help="describe a CLAM / TRIDENT / graphmil feature folder",
                       description="Detect the layout of a feature folder and print its slides, "
                                   "feature dimensions and coordinate spacing / step.")
    p.add_argument("folder", help="the feature folder")
    p.add_argument("--encoder", help="TRIDENT encoder to pick when there are several")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list the registered models",
                       description="List the models create_model() knows.")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``graphmil`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileExistsError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"graphmil {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
