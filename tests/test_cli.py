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
    assert {"results.csv", "summary.json", "config.yaml", "seed0_fold0"} <= set(os.listdir(run))
    ckpt = str(run / "seed0_fold0" / "checkpoints" / "best.pt")
    dk = '{"num_bags": 12, "num_features": 8, "min_instances": 4, "max_instances": 12}'
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ckpt, "--dataset", "synthetic", "--dataset-kwargs", dk,
                 "--out", str(tmp_path / "ev"), "--scores"]) == 0
    assert "auroc" in capsys.readouterr().out
    assert {"metrics.json", "bags.csv", "scores"} <= set(os.listdir(tmp_path / "ev"))
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
