import json
import math
import os

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from graphmil.models import create_model
from graphmil.models.abmil import ABMIL
from graphmil.train import TrainConfig, cross_validate, evaluate, fit, load_checkpoint
from graphmil.train.engine import _class_weights, bag_labels, lr_factor, make_run_dir, subset


@pytest.fixture(scope="module")
def bags():
    from graphmil.datasets import SyntheticBags

    ds = SyntheticBags(num_bags=16, num_features=8, seed=3, min_instances=6, max_instances=20, signal=2.0)
    return [ds[i] for i in range(len(ds))]


def cfg(**kw):
    base = dict(epochs=2, batch_size=4, lr=1e-3, progress=False, device="cpu", scheduler="none")
    base.update(kw)
    return TrainConfig(**base)


def small(seed=0, name="abmil", **kw):
    torch.manual_seed(seed)
    return create_model(name, 8, **({"embed_dim": 8, "attention_dim": 4} if name == "abmil" else {}), **kw)


def params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_fit_writes_a_run_dir_and_learns_nothing_with_lr0(bags, tmp_path):
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


def test_losses_recorded_equal_hand_computation(bags):
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


def test_aem_needs_attention(bags, tmp_path):
    m = create_model("meanmil", 8, embed_dim=8)
    with pytest.raises(ValueError, match="attention"):
        fit(m, bags[:8], None, cfg(aem_lambda=0.1), run_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_existing_run_dir_is_refused_untouched(bags, tmp_path):
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


def test_resume_gives_the_same_parameters(bags, tmp_path):
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


def test_early_stopping_and_best_restored(bags):
    # lr = 0: the validation metric never improves after epoch 0
    res = fit(small(), bags[:12], bags[12:], cfg(epochs=10, lr=0.0, weight_decay=0.0, patience=2))
    assert res.epochs_run == 3 and res.best_epoch == 0
    res = fit(small(), bags[:12], bags[12:], cfg(epochs=4, lr=0.0, weight_decay=0.0, patience=1, min_epochs=4))
    assert res.epochs_run == 4
    with pytest.raises(ValueError, match="monitor"):
        fit(small(), bags[:12], bags[12:], cfg(monitor="aucroc"))


def test_lr_schedules():
    c = TrainConfig(epochs=10, warmup_epochs=4, warmup_start_factor=0.1, scheduler="cosine", min_lr_factor=0.0)
    f = [lr_factor(e, c) for e in range(10)]
    np.testing.assert_allclose(f[:4], [0.1, 0.325, 0.55, 0.775])
    np.testing.assert_allclose(f[4:], [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])
    assert all(lr_factor(e, TrainConfig(scheduler="constant")) == 1.0 for e in range(5))
    m = small()
    res = fit(m, _tiny(), None,
              TrainConfig(epochs=3, lr=1e-2, warmup_epochs=2, progress=False, device="cpu"))
    assert [h["lr"] for h in res.history] == pytest.approx([1e-3, 5.5e-3, 1e-2])


def _tiny():
    from graphmil.datasets import SyntheticBags
    return list(SyntheticBags(num_bags=4, num_features=8, seed=1, min_instances=3, max_instances=5))


def test_class_weights():
    pw, cw = _class_weights(np.array([0, 0, 0, 1]), 1, "balanced")
    assert cw is None and float(pw) == pytest.approx(3.0)
    pw, cw = _class_weights(np.array([0, 1, 2, 2]), 3, "balanced")
    assert pw is None and cw.tolist() == pytest.approx([4 / 3, 4 / 3, 2 / 3])
    pw, _ = _class_weights(np.array([0, 1]), 1, [1.0, 4.0])
    assert float(pw) == 4.0
    with pytest.raises(ValueError, match="class"):
        _class_weights(np.array([0, 0]), 1, "balanced")


class SpyABMIL(ABMIL):
    seen = None

    def prepare(self, train_bags):
        SpyABMIL.seen = [b.slide_id for b in train_bags]


def test_prepare_sees_the_training_split_only(bags):
    m = SpyABMIL(8, embed_dim=8)
    fit(m, bags[:10], bags[10:], cfg(epochs=1))
    assert SpyABMIL.seen == [b.slide_id for b in bags[:10]]


def test_evaluate_matches_per_bag_forward_and_batch_size(bags):
    from graphmil.metrics import bag_metrics, instance_auroc

    m = small().eval()
    ev1 = evaluate(m, bags, batch_size=1)
    ev5 = evaluate(m, bags, batch_size=5)
    for k in ev1:
        assert ev1[k] == pytest.approx(ev5[k], rel=1e-5, nan_ok=True)
    with torch.no_grad():
        logits = torch.cat([m(Batch.from_data_list([b])).bag_logits for b in bags])
        scores = torch.cat([m(Batch.from_data_list([b])).instance_scores for b in bags])
    y = torch.cat([b.y for b in bags])
    ref = bag_metrics(logits, y)
    for k in ref:
        assert ev5[k] == pytest.approx(ref[k])
    yi = torch.cat([b.y_inst for b in bags])
    assert ev5["instance_auroc"] == pytest.approx(instance_auroc(scores, yi))
    np.testing.assert_allclose(ev5.predictions["instance_score"], scores.numpy(), rtol=1e-5, atol=1e-6)
    assert ev5.predictions["slide_id"] == [b.slide_id for b in bags]


def test_cross_validate(bags, tmp_path):
    out = tmp_path / "cv"
    res = cross_validate(bags, "abmil", {"embed_dim": 8, "attention_dim": 4}, cfg(epochs=1), folds=2,
                         seeds=[0, 1], val_fraction=0.25, out_dir=str(out))
    assert len(res.rows) == 4
    assert res.summary["auroc"]["mean"] == pytest.approx(np.nanmean([r["auroc"] for r in res.rows]))
    assert res.summary["accuracy"]["std"] == pytest.approx(np.std([r["accuracy"] for r in res.rows]))
    assert {"results.csv", "summary.json", "seed0_fold0", "seed1_fold1"} <= set(os.listdir(out))
    assert json.loads((out / "summary.json").read_text())["summary"]["auroc"]["n"] >= 1
    # the outer folds of one seed partition the bags
    labels = bag_labels(bags)
    from sklearn.model_selection import StratifiedKFold
    te = [t for _, t in StratifiedKFold(2, shuffle=True, random_state=0).split(np.zeros(16), labels)]
    assert sorted(np.concatenate(te).tolist()) == list(range(16))
    # existing output and unknown model: refused before anything is written
    with pytest.raises(ValueError, match="already exists"):
        cross_validate(bags, "abmil", {}, cfg(), folds=2, out_dir=str(out))
    with pytest.raises(ValueError, match="Unknown model"):
        cross_validate(bags, "abmill", {}, cfg(), folds=2, out_dir=str(tmp_path / "cv2"))
    assert not (tmp_path / "cv2").exists()


def test_subset_of_pyg_dataset():
    from graphmil.datasets import SyntheticBags
    ds = SyntheticBags(num_bags=6, num_features=4, seed=0, min_instances=3, max_instances=4)
    sub = subset(ds, [4, 1])
    assert len(sub) == 2 and sub[0].slide_id == ds[4].slide_id
