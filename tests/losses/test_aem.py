"""AEM: attention entropy against numpy, the loss formula, and a gradient step raising entropy."""

import math

import numpy as np
import pytest
import torch

from graphmil.losses import AEMLoss, attention_entropy
from graphmil.nn.aggr import AttentionAggregation
from graphmil.utils import segment_softmax

SIZES = [5, 1, 9, 3]


def _att(sizes=SIZES, heads=None, seed=0, mask=None):
    g = torch.Generator().manual_seed(seed)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    shape = (index.numel(),) if heads is None else (index.numel(), heads)
    logits = 2 * torch.randn(*shape, generator=g)
    return segment_softmax(logits, index, len(sizes), mask=mask), index, logits


def _np_entropy(p):
    p = np.asarray(p, dtype=np.float64)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


@pytest.mark.parametrize("heads", [None, 3])
def test_entropy_matches_numpy(heads):
    att, index, _ = _att(heads=heads)
    perm = torch.randperm(index.numel())
    ent = attention_entropy(att[perm], index[perm], 4)
    a = att.view(att.size(0), -1).numpy()
    idx = index.numpy()
    ref = [np.mean([_np_entropy(a[idx == b, h]) for h in range(a.shape[1])]) for b in range(4)]
    np.testing.assert_allclose(ent.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert ent[1] == 0  # one-instance bag


def test_entropy_equals_stable_logit_form_and_handles_mask_and_empty_rows():
    mask = torch.tensor([1, 0, 1, 1, 0] + [0] + [1] * 9 + [1, 1, 0], dtype=torch.bool)
    att, index, logits = _att(mask=mask)
    ent = attention_entropy(att, index, 6)  # rows 4, 5 empty
    assert ent.shape == (6,) and ent[1] == 0 and (ent[4:] == 0).all()
    b0 = logits[[0, 2, 3]]
    ref = -(torch.softmax(b0, 0) * torch.log_softmax(b0, 0)).sum()
    torch.testing.assert_close(ent[0], ref)
    assert attention_entropy(torch.full((4,), 0.25))[0].item() == pytest.approx(math.log(4))


def test_aem_loss_formula_normalize_and_mask():
    att, index, _ = _att(heads=2)
    ent = attention_entropy(att, index, 4)
    loss = AEMLoss(0.1)(att, index, 4)
    torch.testing.assert_close(loss, -0.1 * ent.mean())
    # normalised: per (bag, head) entropy / log N_b; N_b = 1 gives 0
    a = att.numpy()
    idx = index.numpy()
    per_bag = []
    for b, n in enumerate(SIZES):
        hs = [(_np_entropy(a[idx == b, h]) / math.log(n)) if n > 1 else 0.0 for h in range(2)]
        per_bag.append(np.mean(hs))
    ln = AEMLoss(0.1, normalize=True)(att, index, 4)
    assert ln.item() == pytest.approx(-0.1 * np.mean(per_bag), rel=1e-5)
    # empty dim_size rows are ignored in the mean over bags
    torch.testing.assert_close(AEMLoss(0.1)(att, index, 7), loss)
    # N_b = number of unmasked instances (explicit mask or attention > 0)
    mask = torch.ones(index.numel(), dtype=torch.bool)
    mask[[0, 1]] = False
    att_m, _, _ = _att(mask=mask)
    e0 = _np_entropy(att_m[:5].numpy())
    ln_m = AEMLoss(1.0, normalize=True)
    per = [e0 / math.log(3), 0.0] + [_np_entropy(att_m[index == b].numpy()) / math.log(SIZES[b]) for b in (2, 3)]
    assert ln_m(att_m, index, 4).item() == pytest.approx(-np.mean(per), rel=1e-5)
    assert ln_m(att_m, index, 4, mask=mask).item() == pytest.approx(-np.mean(per), rel=1e-5)


def test_one_gradient_step_on_aem_increases_entropy():
    torch.manual_seed(0)
    pool = AttentionAggregation(8, heads=2)
    x = 3 * torch.randn(30, 8)
    index = torch.repeat_interleave(torch.arange(3), torch.tensor([12, 10, 8]))
    loss_fn = AEMLoss(1.0)
    opt = torch.optim.SGD(pool.parameters(), lr=0.05)
    before = attention_entropy(pool.attend(x, index, 3).attention, index, 3)
    opt.zero_grad()
    loss_fn(pool.attend(x, index, 3).attention, index, 3).backward()
    opt.step()
    after = attention_entropy(pool.attend(x, index, 3).attention, index, 3)
    assert after.mean() > before.mean() + 1e-4


def test_gradient_finite_with_zero_attention():
    logits = torch.randn(6, requires_grad=True)
    index = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool)
    att = segment_softmax(logits, index, 2, mask=mask)
    AEMLoss(1.0, normalize=True)(att, index, 2).backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[~mask] == 0).all()
    a = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5], requires_grad=True)
    attention_entropy(a, torch.tensor([0, 0, 0, 1, 1])).sum().backward()
    assert torch.isfinite(a.grad).all()


def test_repr_and_errors():
    assert repr(AEMLoss(0.005)) == "AEMLoss(lam=0.005, normalize=False)"
    with pytest.raises(ValueError, match="'lam'"):
        AEMLoss(-1.0)
    with pytest.raises(ValueError, match="'attention'"):
        attention_entropy(torch.rand(2, 2, 2))
    with pytest.raises(ValueError, match="'index'"):
        AEMLoss(1.0)(torch.rand(3), torch.zeros(2, dtype=torch.long))
