"""The ``graphmil`` command: ``demo``, ``train``, ``eval``, ``heatmap``, ``export``, ``report``, ``info``,
``models``.

Every sub-command checks its inputs (config keys, model name, labels vs slides, output folder)
*before* writing anything; a bad input prints ``graphmil: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
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


def _data_config(args):
    from graphmil.train.config import DataConfig

    kw = json.loads(args.dataset_kwargs) if getattr(args, "dataset_kwargs", None) else {}
    if args.folder:
        if not args.labels:
            raise CLIError("--folder needs --labels (a CSV/TSV with slide_id and label columns)")
        return DataConfig(dataset="folder", root=args.folder, labels=args.labels, kwargs=kw)
    if args.dataset:
        return DataConfig(dataset=args.dataset, root=args.root, kwargs=kw)
    raise CLIError("give a data source: --dataset NAME or --folder DIR --labels FILE")


def _dataset_and_sources(args):
    from graphmil.train.data import build_dataset, source_folders

    data = _data_config(args)
    dataset = build_dataset(data)
    return dataset, source_folders(dataset, data)


def _check_out(path: Optional[str], sources, what: str = "output directory") -> None:
    from graphmil.train.data import check_output_dir

    _require_new(path, what)
    check_output_dir(path, sources, what)


def _check_width(model, dataset, checkpoint: str) -> None:
    from graphmil.train.data import check_feature_widths

    width = check_feature_widths(dataset)
    if width != int(model.in_channels):
        raise CLIError(f"checkpoint '{checkpoint}' takes {model.in_channels} features per instance, "
                       f"but the bags have {width}")


# ------------------------------------------------------------------------------------ commands
def cmd_models(args) -> int:
    from graphmil.models import list_models
    from graphmil.models.registry import model_description

    for name in list_models():
        para = model_description(name)
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
    from graphmil.train.config import load_config
    from graphmil.train.cv import cross_validate
    from graphmil.train.data import build_dataset
    from graphmil.train.distributed import init_distributed, is_main_process

    if bool(args.config) == bool(args.resume):
        raise CLIError("give either --config FILE (a new run) or --resume DIR (continue a run)")
    if args.resume:
        if args.out:
            raise CLIError("--resume continues the run in its own directory; --out does not apply")
        out = args.resume
        cfg_path = os.path.join(out, "config.yaml")
        if not os.path.isfile(cfg_path):
            raise CLIError(f"cannot resume '{out}': it has no config.yaml (is it a graphmil train run?)")
        cfg = load_config(cfg_path)
    else:
        cfg_path = args.config
        cfg = load_config(cfg_path)
        if args.out:
            cfg.out = args.out
        out = cfg.out or _free_dir("runs", cfg.name)
        _require_new(out, "run directory")
        cfg.out = out
    # cheap checks first: the model name and its arguments, the output folder
    from graphmil.models import list_models
    from graphmil.models.registry import check_model_kwargs
    from graphmil.train.data import check_output_dir

    if cfg.model.name.lower() not in list_models():
        import difflib
        close = difflib.get_close_matches(cfg.model.name.lower(), list_models(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise CLIError(f"{cfg_path}: unknown model '{cfg.model.name}'.{hint} "
                       f"Known models: {', '.join(list_models())}")
    sources = [cfg.data.root] if cfg.data.dataset.lower() == "folder" and cfg.data.root else []
    try:
        check_model_kwargs(cfg.model.name, cfg.model.kwargs)
        check_output_dir(out, [Path(s).resolve() for s in sources], "run directory")
    except ValueError as e:
        raise CLIError(f"{cfg_path}: {e}") from None
    init_distributed()  # under torchrun (WORLD_SIZE > 1): DDP + DistributedSampler in the engine
    dataset = build_dataset(cfg.data)  # labels vs slides are checked here, before any write
    try:
        res = cross_validate(dataset, cfg.model.name, cfg.model.kwargs, cfg.train, folds=cfg.cv.folds,
                             seeds=cfg.cv.seeds, val_fraction=cfg.cv.val_fraction,
                             test_fraction=cfg.cv.test_fraction, num_classes=cfg.data.num_classes,
                             out_dir=out, splits=cfg.cv.splits, resume=bool(args.resume), experiment=cfg,
                             sources=[Path(s).resolve() for s in sources])
    except KeyboardInterrupt:
        if os.path.isdir(out):
            print(f"interrupted; continue with: graphmil train --resume {out}", file=sys.stderr)
        raise
    except ValueError as e:
        raise CLIError(f"{cfg_path}: {e}") from None
    if is_main_process():
        print(res.table())
        print(f"run directory: {out} (splits.csv, predictions.csv, results.csv, summary.json, "
              "seed<s>_fold<k>/checkpoints)")
        _write_run_report(out, dataset)
    return 0


def _write_predictions(out: str, rows, metrics) -> None:
    from graphmil.train.runs import write_rows

    os.makedirs(out)
    with open(os.path.join(out, "metrics.json"), "x") as f:
        json.dump(metrics, f, indent=2, default=str)
    write_rows(os.path.join(out, "predictions.csv"), rows)


def cmd_eval(args) -> int:
    from graphmil.metrics.bag import ignore_undefined_metrics
    from graphmil.train.checkpoint import load_checkpoint
    from graphmil.train.inference import metrics_from_predictions, predict

    if bool(args.run) == bool(args.checkpoint):
        raise CLIError("give either --run DIR (a cross-validation run) or --checkpoint FILE with a data source")
    if args.run:
        from graphmil.train.cv import evaluate_run

        if not os.path.isdir(args.run):
            raise CLIError(f"--run '{args.run}' is not a folder")
        dataset = None
        sources = []
        if args.folder or args.dataset:
            dataset, sources = _dataset_and_sources(args)
        _check_out(args.out, sources)
        res = evaluate_run(args.run, dataset, batch_size=args.batch_size, bootstrap=args.bootstrap)
        for seed, pm in res.pooled.items():
            print(f"seed {seed}: pooled out-of-fold predictions of {sum(1 for r in res.predictions if str(r['seed']) == seed)} "
                  "test slides (95 % CI, case bootstrap)")
            for k, v in pm.items():
                print(f"  {k:<20} {v['value']:.4f}  [{v['low']:.4f}, {v['high']:.4f}]")
        if args.out:
            _write_predictions(args.out, res.predictions, {"folds": res.rows, "pooled_out_of_fold": res.pooled})
            print(f"written: {args.out}")
        return 0
    model, _ = load_checkpoint(args.checkpoint)  # readable before anything else
    dataset, sources = _dataset_and_sources(args)
    _check_out(args.out, sources)
    _check_width(model, dataset, args.checkpoint)
    records = list(predict(model, dataset, batch_size=args.batch_size))
    with ignore_undefined_metrics():
        metrics = metrics_from_predictions(records)
    for k, v in metrics.items():
        print(f"{k:<24} {v:.4f}")
    if args.out:
        from graphmil.train.data import dataset_meta
        from graphmil.train.runs import FoldPlan, prediction_rows

        names = dataset_meta(dataset).class_names[: max(2, int(model.num_classes))]
        rows = prediction_rows(records, FoldPlan(-1, -1, [], [], []), {r.index: "eval" for r in records}, names)
        _write_predictions(args.out, rows, metrics)
        if args.scores:
            _export_scores(records, os.path.join(args.out, "scores"), sources)
        print(f"written: {args.out}")
    return 0


def _export_scores(records, folder: str, sources=()) -> List[str]:
    from graphmil.io import write_scores

    os.makedirs(folder, exist_ok=True)
    paths = []
    for r in records:
        if r.pos is None or r.instance_scores is None:
            continue
        scores = {"score": r.instance_scores}
        if r.attention is not None:
            scores["attention"] = r.attention
        src = sources[0] if sources else None
        paths.append(str(write_scores(os.path.join(folder, f"{r.slide_id}.h5"), r.to_data(),
                                      source_dir=src, **scores)))
    return paths


def cmd_heatmap(args) -> int:
    from graphmil.train.checkpoint import load_checkpoint
    from graphmil.train.data import dataset_meta, subset
    from graphmil.train.inference import predict
    from graphmil.viz.heatmap import heatmap_of_prediction

    model, _ = load_checkpoint(args.checkpoint)
    dataset, sources = _dataset_and_sources(args)
    out = args.out or _free_dir("runs", "heatmaps")
    _check_out(out, sources)
    _check_width(model, dataset, args.checkpoint)
    meta = dataset_meta(dataset)
    names = meta.class_names[: max(2, int(model.num_classes))]
    if args.bag:
        idx = []
        for b in args.bag:
            if b in meta.slide_ids:
                idx.append(meta.slide_ids.index(b))
            elif b.isdigit() and int(b) < len(dataset):
                idx.append(int(b))
            else:
                raise CLIError(f"--bag '{b}' is neither a slide id nor an index below {len(dataset)}")
    else:
        pos = [i for i, y in enumerate(meta.labels) if y != 0]
        idx = [pos[0] if pos else 0]
    records = list(predict(model, subset(dataset, idx)))
    if records and records[0].instance_scores is None:
        raise CLIError("the model returns no instance scores")
    slide_files = _slide_files(args, records)
    os.makedirs(out)
    for j, r in enumerate(records):
        if slide_files.get(r.slide_id) is not None:
            from graphmil.viz.overlay import overlay_heatmap

            path = overlay_heatmap(r, slide_files[r.slide_id], os.path.join(out, f"{r.slide_id}.png"),
                                   width=args.width, scale=args.scale, class_names=names).path
            print(f"{path} (over {slide_files[r.slide_id]})")
            continue
        image = dataset.image(idx[j]) if hasattr(dataset, "image") else None
        path = heatmap_of_prediction(r, os.path.join(out, f"{r.slide_id}.png"), class_names=names,
                                     image=image, scale=args.scale)
        print(path)
    if args.scores:
        for path in _export_scores(records, out, sources):
            print(path)
    return 0


def _slide_files(args, records) -> dict:
    """``slide_id -> whole-slide image path`` for ``--slides DIR`` (slides without a file: absent)."""
    if not getattr(args, "slides", None):
        return {}
    from graphmil.viz.overlay import find_slide

    if not os.path.isdir(args.slides):
        raise CLIError(f"--slides '{args.slides}' is not a folder")
    if args.width < 16:
        raise CLIError(f"--width must be at least 16 px, got {args.width}")
    found = {}
    for r in records:
        p = find_slide(args.slides, r.slide_id)
        if p is None:
            print(f"note: no slide file for '{r.slide_id}' in {args.slides}; drawing the tile grid", file=sys.stderr)
        else:
            found[r.slide_id] = str(p)
    return found


def _write_run_report(run_dir: str, dataset=None) -> None:
    """Write ``report.html`` at the end of ``graphmil train``; a failure only warns (the run is done)."""
    from graphmil.viz.report import write_report

    try:
        path = write_report(run_dir, dataset)
    except Exception as e:  # the run itself is complete and valid: never fail it for its report
        print(f"warning: report.html not written ({type(e).__name__}: {e}); "
              f"retry with: graphmil report {run_dir}", file=sys.stderr)
        return
    print(f"report: {path}")


def cmd_export(args) -> int:
    from graphmil.io.geojson import export_prediction, tile_size
    from graphmil.train.checkpoint import load_checkpoint
    from graphmil.train.data import dataset_meta
    from graphmil.train.inference import predict

    if bool(args.run) == bool(args.checkpoint):
        raise CLIError("give either --run DIR (each slide scored by the fold that held it out) or "
                       "--checkpoint FILE with a data source")
    if args.merge and args.threshold is None:
        raise CLIError("--merge needs --threshold (the value tiles must reach to join a region)")
    if args.merge and args.format != "geojson":
        raise CLIError("--merge writes region annotations: it needs --format geojson")
    if args.top_k is not None and args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    if args.patch_size is not None and not args.patch_size > 0:
        raise CLIError(f"--patch-size must be > 0 (level-0 px), got {args.patch_size}")
    out = args.out or _free_dir("runs", "export")
    if args.run:
        from graphmil.train.data import source_folders
        from graphmil.train.cv import run_dataset
        from graphmil.viz.report import out_of_fold_predictions

        if not os.path.isdir(args.run):
            raise CLIError(f"--run '{args.run}' is not a folder")
        if args.folder or args.dataset:
            dataset, sources = _dataset_and_sources(args)
        else:
            from graphmil.train.config import load_config

            dataset = run_dataset(args.run)
            sources = source_folders(dataset, load_config(os.path.join(args.run, "config.yaml")).data)
        _check_out(out, sources)
        oof = list(out_of_fold_predictions(args.run, dataset, seed=args.seed, batch_size=args.batch_size))
        if not oof:
            raise CLIError(f"--run '{args.run}': no test slide to export")
        records = [o.record for o in oof]
        model_name = oof[0].model_name
        num_classes = len(records[0].probabilities)
        where = f"seed {oof[0].seed}, {len({o.fold for o in oof})} fold(s), each slide by the fold that held it out"
    else:
        model, ckpt = load_checkpoint(args.checkpoint)
        dataset, sources = _dataset_and_sources(args)
        _check_out(out, sources)
        _check_width(model, dataset, args.checkpoint)
        records = list(predict(model, dataset, batch_size=args.batch_size))
        model_name = str((ckpt.get("model_spec") or {}).get("name", type(model).__name__))
        num_classes = max(2, int(model.num_classes))
        where = f"checkpoint {args.checkpoint}"
    names = dataset_meta(dataset).class_names[:max(2, num_classes)]
    # every slide checked before the first write
    for r in records:
        if r.pos is None:
            raise CLIError(f"slide '{r.slide_id}' has no positions: nothing to place on the slide")
        if r.instance_scores is None:
            raise CLIError(f"the model ({model_name}) gives no instance scores (slide '{r.slide_id}')")
        if args.format != "h5" or args.patch_size is not None:
            tile_size(r, args.patch_size)
        if args.by != "score" and r.attention is None:
            raise CLIError(f"--by {args.by}: the model ({model_name}) gives no attention (slide '{r.slide_id}')")
    os.makedirs(out)
    src = sources[0] if sources else None
    for r in records:
        export_prediction(r, out, format=args.format, class_names=names, model_name=model_name,
                          patch_size=args.patch_size, object_type=args.object_type, by=args.by, top_k=args.top_k,
                          threshold=args.threshold, merge=args.merge, source_dir=src)
    print(f"wrote {len(records)} {args.format} file(s) to {out} ({where})")
    return 0


def cmd_report(args) -> int:
    from graphmil.viz.report import REPORT_NAME, write_report

    run = args.run_dir
    if not os.path.isdir(run):
        raise CLIError(f"'{run}' is not a folder")
    if not os.path.isfile(os.path.join(run, "summary.json")):
        raise CLIError(f"'{run}' has no summary.json: not a finished graphmil train run "
                       "(finish it with graphmil train --resume first)")
    if args.slides and not os.path.isdir(args.slides):
        raise CLIError(f"--slides '{args.slides}' is not a folder")
    dataset = None
    if args.folder or args.dataset:
        dataset, _ = _dataset_and_sources(args)
    path = write_report(run, dataset, num_slides=args.num_slides, slides_dir=args.slides, width=args.width,
                        seed=args.seed)
    print(path if os.path.basename(path) == REPORT_NAME else f"report: {path}")
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
                       description="Cross-validate a model from a YAML config (sections model, data, "
                                   "train, cv; see docs/training.md), splitting by patient (case_id). "
                                   "Writes a new run directory with splits.csv, per-fold checkpoints and "
                                   "predictions.csv, results.csv and summary.json (pooled out-of-fold "
                                   "metrics with 95 % CI). --resume DIR finishes an interrupted run.")
    p.add_argument("--config", help="YAML config file (a new run)")
    p.add_argument("--out", help="run directory to create (overrides the config's 'out'; must not exist)")
    p.add_argument("--resume", metavar="DIR", help="finish an interrupted run: finished folds are kept, the "
                   "interrupted fold continues from its last.pt (same result as an uninterrupted run)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's folds, or a checkpoint on a dataset / folder",
                       description="--run DIR: score every fold's checkpoint of a graphmil train run on "
                                   "that fold's own test slides and pool the out-of-fold predictions "
                                   "(metrics with a case-level bootstrap 95 % CI). --checkpoint FILE: "
                                   "evaluate one checkpoint on a named dataset or a feature folder.")
    p.add_argument("--run", help="a run directory written by graphmil train")
    p.add_argument("--checkpoint", help="a best.pt / last.pt checkpoint")
    _add_data_args(p)
    p.add_argument("--out", help="new folder for metrics.json, predictions.csv (and scores/ with --scores)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of the CI (default 1000)")
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
    p.add_argument("--scale", default="minmax", choices=["minmax", "rank", "attention", "probability"],
                   help="colour scale: per-slide min-max (default) or rank of the instance scores, or the "
                        "same absolute scale on every slide: attention x N or probability")
    p.add_argument("--slides", metavar="DIR", help="folder of whole-slide images <slide_id>.svs/.tif/...: draw the "
                   "heatmap over the slide's thumbnail (tiffslide / openslide) when its file is there")
    p.add_argument("--width", type=int, default=2000, help="thumbnail width in px with --slides (default 2000)")
    p.set_defaults(func=cmd_heatmap)

    p = sub.add_parser("export", help="export instance scores as QuPath GeoJSON (or CSV / h5)",
                       description="Write one <slide_id>.geojson per slide into a new folder: a FeatureCollection "
                                   "of square tile polygons in level-0 pixels with the scores as QuPath "
                                   "measurements (File > Import objects in QuPath >= 0.4, or drag and drop). "
                                   "--run DIR scores each test slide with the fold that held it out; "
                                   "--checkpoint FILE scores a dataset / folder with one checkpoint.")
    p.add_argument("--run", help="a run directory written by graphmil train")
    p.add_argument("--seed", type=int, help="with --run: the seed whose folds are used (default: the first)")
    p.add_argument("--checkpoint", help="a best.pt / last.pt checkpoint")
    _add_data_args(p)
    p.add_argument("--out", help="new folder for the files (default runs/export[-N])")
    p.add_argument("--format", default="geojson", choices=["geojson", "csv", "h5"],
                   help="geojson (default, QuPath), csv (x, y, patch size, measurements) or h5 (write_scores)")
    p.add_argument("--by", default="score", choices=["score", "attention", "attention_x_n"],
                   help="the value --top-k / --threshold / --merge use (default score)")
    p.add_argument("--top-k", type=int, help="only the K highest tiles of each slide")
    p.add_argument("--threshold", type=float, help="only tiles with value >= T (classified in QuPath)")
    p.add_argument("--merge", action="store_true", help="add the union of adjacent tiles >= --threshold as "
                   "'predicted region' annotations (shapely)")
    p.add_argument("--patch-size", type=float, help="tile side in level-0 px (default: the slides' "
                   "patch_size_level0 attribute)")
    p.add_argument("--object-type", default="tile", choices=["tile", "detection"],
                   help="QuPath object type of the tiles (default tile)")
    p.add_argument("--batch-size", type=int, default=16, help="bags per forward pass (default 16)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="(re)write report.html of a train run",
                       description="Write DIR/report.html: metrics with CIs, ROC, calibration, confusion matrix, "
                                   "training curves and heatmaps of a few test slides, self-contained (images "
                                   "embedded). graphmil train writes it at the end; this rebuilds it, replacing "
                                   "only a report.html graphmil wrote.")
    p.add_argument("run_dir", metavar="DIR", help="a finished run directory of graphmil train")
    _add_data_args(p)
    p.add_argument("--slides", metavar="DIR", help="folder of whole-slide images: heatmaps over the slides")
    p.add_argument("--width", type=int, default=1200, help="thumbnail width with --slides (default 1200)")
    p.add_argument("--num-slides", type=int, default=3, help="test slides shown with a heatmap (default 3)")
    p.add_argument("--seed", type=int, help="the seed whose slides are shown (default: the first)")
    p.set_defaults(func=cmd_report)

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
    except FloatingPointError as e:
        print(f"graphmil {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
