"""Run-directory files: splits.csv round trip, CLAM split files, leak checks, history.csv."""

import csv

import pytest

from graphmil.train.runs import FoldPlan, HistoryWriter, check_no_leak, read_splits, write_splits


IDS = [f"s{i}" for i in range(8)]
CASES = ["a", "a", "b", "b", "c", "c", "d", "d"]


def test_splits_csv_round_trips_and_names_bad_rows(tmp_path):
    plans = [FoldPlan(0, 0, [0, 1, 2, 3], [4, 5], [6, 7]), FoldPlan(0, 1, [4, 5, 6, 7], [], [0, 1, 2, 3])]
    path = str(tmp_path / "splits.csv")
    write_splits(path, plans, IDS, CASES)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and rows[0] == {"seed": "0", "fold": "0", "slide_id": "s0", "case_id": "a", "split": "train"}
    back = read_splits(path, IDS)
    assert [(p.seed, p.fold, p.train, p.val, p.test) for p in back] == \
        [(p.seed, p.fold, p.train, p.val, p.test) for p in plans]
    # slide ids match without their WSI extension
    assert read_splits(path, [f"{s}.svs" for s in IDS])[0].test == [6, 7]
    (tmp_path / "bad.csv").write_text("seed,fold,slide_id,split\n0,0,s0,train\n0,0,s1,holdout\n")
    with pytest.raises(ValueError, match="bad.csv, line 3: split 'holdout'"):
        read_splits(str(tmp_path / "bad.csv"), IDS)
    (tmp_path / "two.csv").write_text("seed,fold,slide_id,split\n0,0,s0,train\n0,0,s0,test\n0,0,s1,test\n")
    with pytest.raises(ValueError, match="two.csv, line 3: slide 's0' is in both 'train' and 'test'"):
        read_splits(str(tmp_path / "two.csv"), IDS)
    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="needs columns"):
        read_splits(str(tmp_path / "cols.csv"), IDS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no splits_<k>.csv"):
        read_splits(str(tmp_path / "empty"), IDS)


def test_leak_check_names_the_case():
    check_no_leak([FoldPlan(0, 0, [0, 1, 2, 3], [], [4, 5, 6, 7])], CASES)
    with pytest.raises(ValueError, match="seed 0 fold 1: case 'b' has slides in test and train"):
        check_no_leak([FoldPlan(0, 0, [0, 1], [], [2, 3]), FoldPlan(0, 1, [0, 1, 2], [], [3])], CASES)


def test_history_writer_appends_and_rewrites_from_a_checkpoint(tmp_path):
    path = str(tmp_path / "history.csv")
    w = HistoryWriter(path)
    w.append({"epoch": 0, "loss": 1.0})
    w.append({"epoch": 1, "loss": 0.5})
    w.append({"epoch": 2, "loss": 0.25, "val_auroc": 0.9})  # a new column widens the file
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] and rows[0]["val_auroc"] == "" and rows[2]["val_auroc"] == "0.9"
    # resume from a checkpoint that saw two epochs: the third row (written after it) is dropped
    HistoryWriter(path, [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}])
    with open(path, newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]
