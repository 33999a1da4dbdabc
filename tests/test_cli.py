"""The ``graphmil`` command: every sub-command's --help, a tiny end-to-end run, and bad input
(unknown config key, model typo, labels with missing slides, existing run dir) failing cleanly
with nothing changed on disk."""

import os

import pytest
import yaml

from graphmil.cli import main


def tree(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


TINY = {"model": {"name": "abmil", "kwargs": {"embed_dim": 8, "attention_dim": 4}},
        "data": {"dataset": "synthetic",
                 "kwargs": {"num_bags": 12, "num_features": 8, "min_instances": 4, "max_instances": 12}},
        "train": {"epochs": 1, "batch_size": 4, "progress": False, "device": "cpu"},
        "cv": {"folds": 1, "val_fraction": 0.25, "test_fraction": 0.34}}


@pytest.mark.parametrize("cmd", [[], ["demo"], ["train"], ["eval"], ["heatmap"], ["info"], ["models"]])
def test_help_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: graphmil" in capsys.readouterr().out


def test_models_lists_registry(capsys):
    from graphmil.models import list_models

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_models())


def _write(tmp_path, d, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return str(p)


def test_train_eval_heatmap_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _write(tmp_path, dict(TINY, out=str(tmp_path / "run")))
    assert main(["train", "--config", cfg]) == 0
    run = tmp_path / "run"
    assert {"results.csv", "summary.json", "config.yaml", "seed0_fold0", "splits.csv",
            "predictions.csv"} <= set(os.listdir(run))
    ckpt = str(run / "seed0_fold0" / "checkpoints" / "best.pt")
    dk = '{"num_bags": 12, "num_features": 8, "min_instances": 4, "max_instances": 12}'
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ckpt, "--dataset", "synthetic", "--dataset-kwargs", dk,
                 "--out", str(tmp_path / "ev"), "--scores"]) == 0
    assert "auroc" in capsys.readouterr().out
    assert {"metrics.json", "predictions.csv", "scores"} <= set(os.listdir(tmp_path / "ev"))
    assert len(os.listdir(tmp_path / "ev" / "scores")) == 12
    assert main(["heatmap", "--checkpoint", ckpt, "--dataset", "synthetic", "--dataset-kwargs", dk,
                 "--bag", "0", "--out", str(tmp_path / "hm")]) == 0
    pngs = os.listdir(tmp_path / "hm")
    assert len(pngs) == 1 and pngs[0].endswith(".png")


def test_unknown_config_key(tmp_path, capsys):
    cfg = _write(tmp_path, {"train": {"epoch": 2}, "out": str(tmp_path / "run")})
    before = tree(tmp_path)
    assert main(["train", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.epoch'" in err and "Did you mean 'epochs'" in err
    assert tree(tmp_path) == before


def test_model_name_typo(tmp_path, capsys):
    cfg = _write(tmp_path, dict(TINY, model={"name": "abmill"}, out=str(tmp_path / "run")))
    before = tree(tmp_path)
    assert main(["train", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'abmill'" in err and "Did you mean 'abmil'" in err
    assert tree(tmp_path) == before


def test_existing_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    cfg = _write(tmp_path, dict(TINY, out=str(run)))
    before = tree(tmp_path)
    assert main(["train", "--config", cfg]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["demo", "--out", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_labels_with_missing_slides(tmp_path, capsys, monkeypatch):
    from graphmil.io import write_synthetic_folder

    monkeypatch.setenv("GRAPHMIL_CACHE", str(tmp_path / "cache"))
    folder = write_synthetic_folder(str(tmp_path / "feat"), layout="clam_h5", num_slides=3, num_features=8)
    labels = tmp_path / "labels.csv"
    text = open(folder.labels_path).read().rstrip("\n") + "\ncase_x,slide_missing,tumor\n"
    labels.write_text(text)
    cfg = _write(tmp_path, dict(TINY, data={"dataset": "folder", "root": str(tmp_path / "feat"),
                                            "labels": str(labels)}, out=str(tmp_path / "run")))
    before = tree(tmp_path)
    assert main(["train", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "slide_missing" in err
    assert tree(tmp_path) == before
    assert main(["info", str(tmp_path / "feat")]) == 0
    out = capsys.readouterr().out
    assert "layout" in out and "clam_h5" in out and "grid step 512 px" in out
    assert "differs" not in out  # the step attribute agrees with the coordinates
    assert tree(tmp_path) == before


def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--epochs", "1", "--models", "ABMIL", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "bag AUROC" in text and "ABMIL" in text and str(out) in text
    assert os.listdir(out / "heatmaps") == ["ABMIL.png"]
    assert {"results.csv", "results.json"} <= set(os.listdir(out))
    assert main(["demo", "--models", "NotAModel", "--out", str(tmp_path / "d2")]) == 2
    assert not (tmp_path / "d2").exists()


# ------------------------------------------------------------------------------------------------
# a cohort run on a CLAM folder: patient-grouped splits, predictions, resume after SIGINT, checks
# ------------------------------------------------------------------------------------------------
def _clam_cohort(tmp_path, monkeypatch, num_cases=8, per_case=3, num_features=8):
    """A CLAM h5 folder whose cases have ``per_case`` slides each (labels by case)."""
    import csv

    from graphmil.io import write_synthetic_folder

    monkeypatch.setenv("GRAPHMIL_CACHE", str(tmp_path / "cache"))
    folder = write_synthetic_folder(str(tmp_path / "feat"), layout="clam_h5", num_slides=num_cases * per_case,
                                    num_features=num_features, num_contours=1)
    with open(folder.labels_path, newline="") as f:
        slides = [r["slide_id"] for r in csv.DictReader(f)]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "slide_id", "label"])
        for i, s in enumerate(slides):
            case = i // per_case
            w.writerow([f"patient{case}", s, "tumor" if case % 2 else "normal"])
    return folder, labels, {s: f"patient{i // per_case}" for i, s in enumerate(slides)}


def _cohort_config(tmp_path, folder, labels, out, **train):
    cfg = {"model": {"name": "abmil", "kwargs": {"embed_dim": 8, "attention_dim": 4}},
           "data": {"dataset": "folder", "root": str(folder.root), "labels": str(labels)},
           "train": {"epochs": 2, "batch_size": 4, "progress": False, "device": "cpu", **train},
           "cv": {"folds": 2, "seeds": [0, 1], "val_fraction": 0.25}, "out": str(out)}
    return _write(tmp_path, cfg)


def _rows(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_on_a_clam_cohort_has_no_patient_leak(tmp_path, capsys, monkeypatch):
    folder, labels, case_of = _clam_cohort(tmp_path, monkeypatch)
    run = tmp_path / "run"
    assert main(["train", "--config", _cohort_config(tmp_path, folder, labels, run)]) == 0
    splits = _rows(run / "splits.csv")
    where = {}
    for r in splits:
        assert r["case_id"] == case_of[r["slide_id"]]
        where.setdefault((r["seed"], r["fold"], r["case_id"]), set()).add(r["split"])
    assert where and all(len(parts) == 1 for parts in where.values())
    preds = _rows(run / "predictions.csv")
    for seed in ("0", "1"):
        test = sorted(r["slide_id"] for r in preds if r["seed"] == seed and r["split"] == "test")
        assert test == sorted(case_of)
    assert {r["label"] for r in preds} == {"normal", "tumor"}  # the original label names
    assert {"prob_normal", "prob_tumor", "prediction"} <= set(preds[0])
    assert "pooled out-of-fold" in capsys.readouterr().out
    # graphmil eval --run: every fold's checkpoint on its own test slides, pooled with a CI
    assert main(["eval", "--run", str(run), "--bootstrap", "50", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "seed 0: pooled out-of-fold predictions of 24 test slides" in out and "auroc" in out
    again = {(r["seed"], r["slide_id"]): float(r["prob_tumor"]) for r in _rows(tmp_path / "ev" / "predictions.csv")}
    for r in preds:
        if r["split"] == "test":
            assert again[(r["seed"], r["slide_id"])] == pytest.approx(float(r["prob_tumor"]), abs=1e-6)


def test_resume_after_sigint_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys
    import time

    folder, labels, _ = _clam_cohort(tmp_path, monkeypatch, num_cases=6, per_case=2)
    train = {"epochs": 6, "scheduler": "cosine"}
    env = dict(os.environ, GRAPHMIL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "graphmil", "train", "--config"]
    full = tmp_path / "full"
    subprocess.run(cmd + [_cohort_config(tmp_path, folder, labels, full, **train)], check=True, env=env,
                   capture_output=True)
    part = tmp_path / "part"
    proc = subprocess.Popen(cmd + [_cohort_config(tmp_path, folder, labels, part, **train)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hist = part / "seed0_fold1" / "history.csv"
    t0 = time.time()
    while time.time() - t0 < 120:  # wait for the second fold to be under way, then Ctrl-C
        if hist.exists() and len(_rows(hist)) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"graphmil train --resume {part}" in err
    assert not (part / "predictions.csv").exists()
    assert main(["train", "--config", _cohort_config(tmp_path, folder, labels, part, **train)]) == 2  # refused
    subprocess.run(cmd[:-1] + ["--resume", str(part)], check=True, env=env, capture_output=True)
    a, b = _rows(full / "predictions.csv"), _rows(part / "predictions.csv")
    assert [(r["seed"], r["fold"], r["slide_id"], r["split"]) for r in a] == \
        [(r["seed"], r["fold"], r["slide_id"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        assert float(ra["prob_tumor"]) == pytest.approx(float(rb["prob_tumor"]), abs=1e-6)
    assert len(_rows(part / "seed0_fold1" / "history.csv")) == len(_rows(full / "seed0_fold1" / "history.csv"))


@pytest.mark.parametrize("case", ["num_classes", "kwarg", "width", "out_inside"])
def test_late_failures_are_errors_before_anything_is_written(case, tmp_path, capsys, monkeypatch):
    import h5py
    import numpy as np

    folder, labels, case_of = _clam_cohort(tmp_path, monkeypatch, num_cases=4, per_case=2)
    run = tmp_path / "run"
    cfg = {"model": {"name": "abmil", "kwargs": {"embed_dim": 8}},
           "data": {"dataset": "folder", "root": str(folder.root), "labels": str(labels)},
           "train": {"epochs": 1, "progress": False}, "cv": {"folds": 2}, "out": str(run)}
    if case == "num_classes":
        text = labels.read_text().splitlines()
        text[1] = text[1].rsplit(",", 1)[0] + ",stroma"  # a third class
        labels.write_text("\n".join(text) + "\n")
        cfg["data"]["num_classes"] = 1
        expect = "data.num_classes is 1 (binary, one logit) but the labels have 3 classes"
    elif case == "kwarg":
        cfg["model"]["kwargs"] = {"embd_dim": 8}
        expect = "Did you mean 'embed_dim'"
    elif case == "width":
        sid = sorted(case_of)[3]
        path = os.path.join(folder.root, "features", "h5_files", f"{sid}.h5")
        with h5py.File(path, "r+") as f:
            n = f["features"].shape[0]
            del f["features"]
            f["features"] = np.zeros((n, 5), dtype=np.float32)
        expect = f"{sid}.h5 (5 features)"
    else:
        cfg["out"] = str(tmp_path / "feat" / "features" / "myrun")
        expect = "inside the source folder"
    path = _write(tmp_path, cfg)
    before = {k: v for k, v in tree(tmp_path).items() if not k.startswith("cache")}
    assert main(["train", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "graphmil train: error: " in err and expect in err, err
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("cache")} == before


def test_eval_and_heatmap_refuse_a_corrupt_checkpoint_and_an_out_inside_the_folder(tmp_path, capsys, monkeypatch):
    folder, labels, _ = _clam_cohort(tmp_path, monkeypatch, num_cases=4, per_case=1)
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"\x80\x04not a pickle")
    before = tree(tmp_path / "feat")
    for cmd in ("eval", "heatmap"):
        assert main([cmd, "--checkpoint", str(bad), "--folder", str(folder.root), "--labels", str(labels),
                     "--out", str(tmp_path / "o")]) == 2
        assert f"checkpoint '{bad}' is not readable" in capsys.readouterr().err
    run = tmp_path / "run"
    cfg = _cohort_config(tmp_path, folder, labels, run, epochs=1)
    assert main(["train", "--config", cfg]) == 0
    ckpt = str(run / "seed0_fold0" / "checkpoints" / "last.pt")
    inside = str(tmp_path / "feat" / "features" / "h5_files" / "ev")
    assert main(["eval", "--checkpoint", ckpt, "--folder", str(folder.root), "--labels", str(labels),
                 "--out", inside]) == 2
    assert "inside the source folder" in capsys.readouterr().err
    assert tree(tmp_path / "feat") == before and not os.path.exists(inside)
