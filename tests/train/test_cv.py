import json
import os

import numpy as np
import pytest
import torch

from graphmil.train import cross_validate


def test_cross_validate(bags, tmp_path, cfg):
    out = tmp_path / "cv"
    res = cross_validate(bags, "abmil", {"embed_dim": 8, "attention_dim": 4}, cfg(epochs=1), folds=2,
                         seeds=[0, 1], val_fraction=0.25, out_dir=str(out))
    assert len(res.rows) == 4
    assert res.summary["auroc"]["mean"] == pytest.approx(np.nanmean([r["auroc"] for r in res.rows]))
    assert res.summary["accuracy"]["std"] == pytest.approx(np.std([r["accuracy"] for r in res.rows]))
    assert {"results.csv", "summary.json", "seed0_fold0", "seed1_fold1"} <= set(os.listdir(out))
    assert json.loads((out / "summary.json").read_text())["summary"]["auroc"]["n"] >= 1
    # the test folds of each seed partition the bags: each slide is predicted once as a test slide
    for seed in (0, 1):
        test = [r["slide_id"] for r in res.predictions if r["split"] == "test" and int(r["seed"]) == seed]
        assert sorted(test) == sorted(b.slide_id for b in bags)
    # existing output and unknown model: refused before anything is written
    with pytest.raises(ValueError, match="already exists"):
        cross_validate(bags, "abmil", {}, cfg(), folds=2, out_dir=str(out))
    with pytest.raises(ValueError, match="Unknown model"):
        cross_validate(bags, "abmill", {}, cfg(), folds=2, out_dir=str(tmp_path / "cv2"))
    assert not (tmp_path / "cv2").exists()


# ------------------------------------------------------------------------------------------------
# patient-grouped splits, splits.csv / predictions.csv, resume, checks before writing
# ------------------------------------------------------------------------------------------------
def _cases(num_cases=12, per_case=3, seed=0, num_features=8, num_classes=2):
    """Bags of ``num_cases`` patients with ``per_case`` slides each; every slide of a case has
    the case's label (class ``case % num_classes``)."""
    from graphmil.datasets import SyntheticBags

    ds = SyntheticBags(num_bags=num_cases * per_case, num_features=num_features, seed=seed,
                       min_instances=4, max_instances=10, signal=2.0)
    out = []
    for i in range(len(ds)):
        b = ds[i]
        case = i // per_case
        b.case_id = f"case{case:02d}"
        b.y = torch.tensor([case % num_classes])
        out.append(b)
    return out


def _csv(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_splits_never_split_a_patient_and_predictions_cover_every_slide(tmp_path, cfg):
    bags = _cases()
    out = tmp_path / "cv"
    res = cross_validate(bags, "abmil", {"embed_dim": 8, "attention_dim": 4}, cfg(epochs=1), folds=3,
                         seeds=[0, 1], val_fraction=0.3, out_dir=str(out), bootstrap=50)
    splits = _csv(out / "splits.csv")
    assert list(splits[0]) == ["seed", "fold", "slide_id", "case_id", "split"]
    case_of = {b.slide_id: b.case_id for b in bags}
    parts = {}
    for r in splits:
        assert case_of[r["slide_id"]] == r["case_id"]
        parts.setdefault((r["seed"], r["fold"], r["case_id"]), set()).add(r["split"])
    assert all(len(v) == 1 for v in parts.values())  # no case in two splits of any fold
    assert {r["split"] for r in splits} == {"train", "val", "test"}
    for (seed, fold), n in {(s, f): 0 for s in "01" for f in "012"}.items():
        rows = [r for r in splits if (r["seed"], r["fold"]) == (seed, fold)]
        assert sorted(r["slide_id"] for r in rows) == sorted(case_of)  # every slide in one part
    preds = _csv(out / "predictions.csv")
    assert list(preds[0]) == ["seed", "fold", "slide_id", "case_id", "label", "prob_0", "prob_1", "prediction", "split"]
    for seed in ("0", "1"):
        test = [r["slide_id"] for r in preds if r["seed"] == seed and r["split"] == "test"]
        assert sorted(test) == sorted(case_of)  # each slide exactly once as a test slide per seed
    for r in preds:  # each row is where splits.csv put it
        assert {"split": r["split"]} in [{"split": s["split"]} for s in splits
                                         if (s["seed"], s["fold"], s["slide_id"]) == (r["seed"], r["fold"], r["slide_id"])]
        assert float(r["prob_0"]) + float(r["prob_1"]) == pytest.approx(1.0, abs=1e-6)
    # fold files hold the same rows; the pooled metric equals sklearn on the pooled test rows
    fold_rows = sum((_csv(out / f"seed{s}_fold{k}" / "predictions.csv") for s in (0, 1) for k in range(3)), [])
    assert len(fold_rows) == len(preds)
    from sklearn.metrics import roc_auc_score
    t0 = [r for r in preds if r["seed"] == "0" and r["split"] == "test"]
    ref = roc_auc_score([int(r["label"]) for r in t0], [float(r["prob_1"]) for r in t0])
    assert res.pooled["0"]["auroc"]["value"] == pytest.approx(ref)
    assert res.pooled["0"]["auroc"]["low"] <= ref <= res.pooled["0"]["auroc"]["high"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pooled_out_of_fold"]["1"]["accuracy"]["value"] == pytest.approx(res.pooled["1"]["accuracy"]["value"])


def test_explicit_clam_splits_are_reproduced_exactly(tmp_path, cfg):
    bags = _cases(num_cases=6, per_case=2)
    ids = [b.slide_id for b in bags]
    folder = tmp_path / "splits"
    folder.mkdir()
    clam = {0: {"train": ids[:8], "val": ids[8:10], "test": ids[10:]},
            1: {"train": ids[4:], "val": ids[2:4], "test": ids[:2]}}
    for k, d in clam.items():  # CLAM's layout: an index column, then train,val,test padded with blanks
        n = max(len(v) for v in d.values())
        lines = [",train,val,test"] + [
            f"{i}," + ",".join(d[c][i] if i < len(d[c]) else "" for c in ("train", "val", "test")) for i in range(n)]
        (folder / f"splits_{k}.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cv"
    cross_validate(bags, "abmil", {"embed_dim": 8, "attention_dim": 4}, cfg(epochs=1), splits=str(folder),
                   out_dir=str(out), bootstrap=10)
    got = {}
    for r in _csv(out / "splits.csv"):
        got.setdefault(int(r["fold"]), {"train": [], "val": [], "test": []})[r["split"]].append(r["slide_id"])
    assert {k: {p: sorted(v) for p, v in d.items()} for k, d in got.items()} == \
        {k: {p: sorted(v) for p, v in d.items()} for k, d in clam.items()}
    # one CLAM file alone is one fold; a leak or an unknown slide is an error naming the file
    (folder / "bad").mkdir()
    (folder / "bad" / "splits_0.csv").write_text(",train,val,test\n0,%s,,%s\n1,%s,,\n" % (ids[0], ids[1], ids[2]))
    with pytest.raises(ValueError, match="patient leak.*case00"):
        cross_validate(bags, "abmil", {}, cfg(), splits=str(folder / "bad" / "splits_0.csv"),
                       out_dir=str(tmp_path / "leak"))
    (folder / "bad" / "splits_1.csv").write_text(",train,val,test\n0,nope,,%s\n" % ids[1])
    with pytest.raises(ValueError, match="splits_1.csv, line 2: slide 'nope'"):
        cross_validate(bags, "abmil", {}, cfg(), splits=str(folder / "bad" / "splits_1.csv"),
                       out_dir=str(tmp_path / "unknown"))
    assert not (tmp_path / "leak").exists() and not (tmp_path / "unknown").exists()


def test_labels_must_fit_num_classes_before_anything_is_written(tmp_path, cfg):
    three = _cases(num_cases=9, per_case=1, num_classes=3)
    kw = {"embed_dim": 8, "attention_dim": 4}
    with pytest.raises(ValueError, match="num_classes is 1 .*3 classes"):
        cross_validate(three, "abmil", kw, cfg(), folds=3, num_classes=1, out_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="num_classes is 2 .*3 classes"):
        cross_validate(three, "abmil", kw, cfg(), folds=3, num_classes=2, out_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="Did you mean 'embed_dim'"):
        cross_validate(three, "abmil", {"embd_dim": 8}, cfg(), folds=3, out_dir=str(tmp_path / "c"))
    odd = _cases(num_cases=6, per_case=1)
    odd[3].x = torch.randn(odd[3].num_nodes, 5)
    with pytest.raises(ValueError, match=f"{odd[3].slide_id} \\(5 features\\)"):
        cross_validate(odd, "abmil", kw, cfg(), folds=2, out_dir=str(tmp_path / "d"))
    assert os.listdir(tmp_path) == []
    # inferred: three classes -> a 3-way head, probabilities per class in predictions.csv
    res = cross_validate(three, "abmil", kw, cfg(epochs=1), folds=3, val_fraction=0.0,
                         out_dir=str(tmp_path / "ok"), bootstrap=10)
    assert json.loads((tmp_path / "ok" / "cv.json").read_text())["num_classes"] == 3
    assert {"prob_0", "prob_1", "prob_2"} <= set(res.predictions[0])


def test_resume_after_an_interrupt_equals_an_uninterrupted_run(tmp_path, cfg, monkeypatch):
    import graphmil.train.loop as loop

    bags = _cases(num_cases=8, per_case=2)
    kw = {"embed_dim": 8, "attention_dim": 4}
    c = cfg(epochs=3, batch_size=4, scheduler="cosine")
    real_step, calls = loop.train_step, {"n": 0, "stop": None}

    def counted(*a, **k):  # Ctrl-C at the last step of the uninterrupted run: the last fold's last epoch
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(loop, "train_step", counted)
    full = cross_validate(bags, "abmil", kw, c, folds=2, seeds=[0], val_fraction=0.25,
                          out_dir=str(tmp_path / "full"), bootstrap=10)
    calls["n"], calls["stop"] = 0, calls["n"]

    with pytest.raises(KeyboardInterrupt):
        cross_validate(bags, "abmil", kw, c, folds=2, seeds=[0], val_fraction=0.25,
                       out_dir=str(tmp_path / "part"), bootstrap=10)
    part = tmp_path / "part"
    assert (part / "seed0_fold0" / "predictions.csv").exists()
    assert not (part / "seed0_fold1" / "predictions.csv").exists()
    assert len(_csv(part / "seed0_fold1" / "history.csv")) == 2  # flushed every epoch
    monkeypatch.setattr(loop, "train_step", real_step)
    with pytest.raises(ValueError, match="already exists"):
        cross_validate(bags, "abmil", kw, c, folds=2, out_dir=str(part))
    res = cross_validate(bags, "abmil", kw, c, folds=2, seeds=[0], val_fraction=0.25, out_dir=str(part),
                         resume=True, bootstrap=10)
    a, b = _csv(tmp_path / "full" / "predictions.csv"), _csv(part / "predictions.csv")
    assert [(r["slide_id"], r["split"]) for r in a] == [(r["slide_id"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        assert float(ra["prob_1"]) == pytest.approx(float(rb["prob_1"]), abs=1e-6)
    assert len(_csv(part / "seed0_fold1" / "history.csv")) == 3
    assert res.pooled["0"]["auroc"]["value"] == pytest.approx(full.pooled["0"]["auroc"]["value"])


def test_evaluate_run_rescores_each_fold_on_its_own_test_slides(tmp_path, cfg):
    from graphmil.train import evaluate_run

    bags = _cases(num_cases=8, per_case=2)
    out = tmp_path / "cv"
    cross_validate(bags, "abmil", {"embed_dim": 8, "attention_dim": 4}, cfg(epochs=2), folds=2,
                   val_fraction=0.25, out_dir=str(out), bootstrap=20)
    res = evaluate_run(str(out), bags, bootstrap=20)
    stored = {(r["fold"], r["slide_id"]): r for r in _csv(out / "predictions.csv") if r["split"] == "test"}
    assert len(res.predictions) == len(stored) == len(bags)
    for r in res.predictions:
        assert float(r["prob_1"]) == pytest.approx(float(stored[(str(r["fold"]), r["slide_id"])]["prob_1"]), abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())["pooled_out_of_fold"]["0"]
    assert res.pooled["0"]["auroc"]["value"] == pytest.approx(summary["auroc"]["value"])
    os.remove(out / "seed0_fold1" / "checkpoints" / "last.pt")
    (out / "seed0_fold1" / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="best.pt' is not readable"):
        evaluate_run(str(out), bags)
