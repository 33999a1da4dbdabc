import math

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from graphmil.train import (TrainConfig, class_weights as _class_weights, fit, lr_factor)


def test_lr_schedules(small):
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


@pytest.mark.parametrize("kw", [dict(scheduler="cosine", warmup_epochs=3, min_lr_factor=0.1),
                                dict(scheduler="cosine"), dict(scheduler="constant", warmup_epochs=2),
                                dict(scheduler="none")])
def test_torch_scheduler_follows_the_closed_form(kw):
    """build_scheduler (torch.optim.lr_scheduler) against the formula of lr_factor, every epoch."""
    from graphmil.train import build_optimizer, build_scheduler

    c = TrainConfig(epochs=12, lr=0.01, **kw)
    m = torch.nn.Linear(2, 1)
    opt = build_optimizer(m, c)
    sch = build_scheduler(opt, c)
    got = []
    for _ in range(c.epochs):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    np.testing.assert_allclose(got, [c.lr * lr_factor(e, c) for e in range(c.epochs)], rtol=1e-9, atol=1e-12)


def test_train_step_is_one_hand_written_step(bags, small):
    """train_step == forward + model.losses + backward + clip + step, written out by hand."""
    from graphmil.train import train_step

    b = Batch.from_data_list(bags[:5])
    m1, m2 = small(seed=1), small(seed=1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    res = train_step(m1.train(), b, o1, grad_clip=0.5)
    out = m2.train()(b)
    loss = sum(m2.losses(out, b).values())
    o2.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.5)
    o2.step()
    assert res.loss == pytest.approx(float(loss)) and res.num_bags == 5 and set(res.terms) == {"task"}
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2)
    b.x = b.x * float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train_step(m1, b, o1)
