import json
import os

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from graphmil.models import create_model
from graphmil.models.abmil import ABMIL
from graphmil.train import (fit, load_checkpoint, make_run_dir)



def test_fit_writes_a_run_dir_and_learns_nothing_with_lr0(bags, tmp_path, cfg, small, params):
    m = small()
    p0 = params(m).clone()
    res = fit(m, bags[:12], bags[12:], cfg(lr=0.0, weight_decay=0.0), run_dir=str(tmp_path / "run"),
              model_spec={"name": "abmil", "in_channels": 8, "num_classes": 1,
                          "kwargs": {"embed_dim": 8, "attention_dim": 4}})
    assert torch.equal(params(m), p0)
    run = tmp_path / "run"
    assert {"config.yaml", "history.csv", "fit.json", "checkpoints"} <= set(os.listdir(run))
    assert set(os.listdir(run / "checkpoints")) == {"best.pt", "last.pt"}
    assert len(res.history) == 2 and res.epochs_run == 2
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "epoch", "config"} <= set(ck) and ck["epoch"] == 2
    # the checkpoint rebuilds the same model
    m2, _ = load_checkpoint(str(run / "checkpoints" / "best.pt"))
    b = Batch.from_data_list(bags[:3])
    torch.testing.assert_close(m2(b).bag_logits, m.eval()(b).bag_logits)


def test_losses_recorded_equal_hand_computation(bags, cfg, small):
    """lr = 0 and one step per epoch: the recorded terms are the initial model's loss on all bags."""
    from graphmil.losses import AEMLoss
    from graphmil.models.base import bag_task_loss

    train = bags[:12]
    n_neg = sum(int(b.y) == 0 for b in train)
    m = small()
    res = fit(m, train, None, cfg(epochs=1, batch_size=12, lr=0.0, weight_decay=0.0, aem_lambda=0.3,
                                 class_weights="balanced"))
    b = Batch.from_data_list(train)
    with torch.no_grad():
        out = m.train()(b)
    pw = torch.tensor([n_neg / (12 - n_neg)])
    task = bag_task_loss(out.bag_logits, b.y, pos_weight=pw)
    aem = AEMLoss(0.3)(out.attention, b.batch, 12)
    h = res.history[0]
    assert h["train_task"] == pytest.approx(float(task), rel=1e-5)
    assert h["train_aem"] == pytest.approx(float(aem), rel=1e-5)
    assert h["train_aem"] < 0
    assert h["train_loss"] == pytest.approx(float(task + aem), rel=1e-5)


def test_aem_needs_attention(bags, tmp_path, cfg):
    m = create_model("meanmil", 8, embed_dim=8)
    with pytest.raises(ValueError, match="attention"):
        fit(m, bags[:8], None, cfg(aem_lambda=0.1), run_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_existing_run_dir_is_refused_untouched(bags, tmp_path, cfg, small):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="already exists"):
        fit(small(), bags[:8], None, cfg(), run_dir=str(d))
    assert os.listdir(d) == ["notes.txt"] and (d / "notes.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="already exists"):
        make_run_dir(str(d))
    a, b2 = make_run_dir(root=str(tmp_path / "runs"), name="x"), make_run_dir(root=str(tmp_path / "runs"), name="x")
    assert os.path.basename(a) == "x" and os.path.basename(b2) == "x-1"


def test_resume_gives_the_same_parameters(bags, tmp_path, cfg, small):
    full = fit(small(), bags[:12], bags[12:], cfg(epochs=2), run_dir=str(tmp_path / "full"))
    part = fit(small(), bags[:12], bags[12:], cfg(epochs=1), run_dir=str(tmp_path / "part"))
    assert part.epochs_run == 1
    resumed = fit(small(), bags[:12], bags[12:], cfg(epochs=2), run_dir=str(tmp_path / "part"), resume=True)
    last_full = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)["model"]
    last_res = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for k in last_full:
        torch.testing.assert_close(last_full[k], last_res[k])
    assert len(resumed.history) == 2
    assert [h["val_auroc"] for h in resumed.history] == pytest.approx([h["val_auroc"] for h in full.history])
    with pytest.raises(ValueError, match="cannot resume"):
        fit(small(), bags[:12], None, cfg(), run_dir=str(tmp_path / "nothing"), resume=True)


def test_early_stopping_and_best_restored(bags, cfg, small):
    # lr = 0: the validation metric never improves after epoch 0
    res = fit(small(), bags[:12], bags[12:], cfg(epochs=10, lr=0.0, weight_decay=0.0, patience=2))
    assert res.epochs_run == 3 and res.best_epoch == 0
    res = fit(small(), bags[:12], bags[12:], cfg(epochs=4, lr=0.0, weight_decay=0.0, patience=1, min_epochs=4))
    assert res.epochs_run == 4
    with pytest.raises(ValueError, match="unknown 'monitor' 'aucroc'. Did you mean 'auroc'"):
        cfg(monitor="aucroc")


class SpyABMIL(ABMIL):
    seen = None
    is_prepared = False  # fit calls prepare only for a model that is not prepared yet

    def prepare(self, train_bags):
        SpyABMIL.seen = [b.slide_id for b in train_bags]


def test_prepare_sees_the_training_split_only(bags, cfg):
    m = SpyABMIL(8, embed_dim=8)
    fit(m, bags[:10], bags[10:], cfg(epochs=1))
    assert SpyABMIL.seen == [b.slide_id for b in bags[:10]]


def test_a_tiny_validation_split_warns_and_falls_back_to_the_loss(bags, tmp_path, cfg, small):
    from graphmil.train import validation_monitor

    val = [b for b in bags if int(b.y) == 0][:2] + [b for b in bags if int(b.y) == 1][:1]
    train = [b for b in bags if all(b is not v for v in val)]
    with pytest.warns(UserWarning, match=r"1 bag\(s\) of class '1' .*chosen by validation 'loss'"):
        res = fit(small(), train, val, cfg(epochs=2), run_dir=str(tmp_path / "r"))
    assert res.monitor == "loss"
    assert all("val_loss" in h for h in res.history)
    assert res.best_epoch == int(np.argmin([h["val_loss"] for h in res.history]))
    fj = json.loads((tmp_path / "r" / "fit.json").read_text())
    assert fj["monitor"] == "loss" and fj["monitor_asked"] == "auroc" and "fewer than 2" in fj["monitor_note"]
    assert validation_monitor(np.array([0, 0, 1, 1]), "auroc") == ("auroc", None)
    assert validation_monitor(np.array([0, 0, 0]), "loss") == ("loss", None)
    assert validation_monitor(np.array([1]), "auroc")[0] is None  # one bag: nothing to choose on
    assert validation_monitor(np.array([0, 0, 0]), "f1", ["normal", "tumor"])[1].startswith(
        "the validation split has 0 bag(s) of class 'tumor'")


def test_casii_keeps_given_keys_and_resume_never_reselects(bags, tmp_path, cfg, monkeypatch):
    import graphmil.models.casii as casii_mod

    keys = torch.randn(37, 8)
    m = create_model("casii", 8, keys=keys, hidden_channels=8)
    fit(m, bags[:12], None, cfg(epochs=1))
    assert m.keys.shape == (37, 8) and torch.equal(m.keys, keys)  # kept, not rebuilt from the data
    m2 = create_model("casii", 8, hidden_channels=8)
    fit(m2, bags[:12], None, cfg(epochs=1, prepare="always"), run_dir=str(tmp_path / "c"))
    bank = m2.keys.clone()
    assert bank.shape[0] != 37

    def no_selection(*a, **k):
        raise AssertionError("resume must not redo the key selection")

    monkeypatch.setattr(casii_mod, "select_negative_keys", no_selection)
    m3 = create_model("casii", 8, hidden_channels=8)
    fit(m3, bags[:12], None, cfg(epochs=2, prepare="always"), run_dir=str(tmp_path / "c"), resume=True)
    assert torch.equal(m3.keys, bank)
