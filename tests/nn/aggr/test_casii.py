"""CASiiAggregation: folded saliency ≡ explicit cosine matrix ≡ a per-bag hand-written reference."""

import pytest
import torch
import torch.nn.functional as F

from graphmil.nn.aggr import CASiiAggregation
from graphmil.utils import index_to_ptr

D, DH, TAU = 12, 6, 9


def reference(pool, x, index, num_bags):
    """The paper's network written out with the module's weights, one bag at a time."""
    kt = torch.tanh(pool.keys @ pool.key_lin.weight.t() + pool.key_lin.bias)
    qt = torch.tanh(x @ pool.query_lin.weight.t() + pool.query_lin.bias)
    vt = torch.relu(x @ pool.value_lin.weight.t() + pool.value_lin.bias)
    C = F.cosine_similarity(qt.unsqueeze(1), kt.unsqueeze(0), dim=-1)  # [N, tau]
    s = C @ pool.saliency_weight + pool.saliency_bias
    pooled, att = [], torch.zeros_like(s)
    for b in range(num_bags):
        m = index == b
        a = torch.softmax(s[m] / pool.temperature, 0)
        att = att.masked_scatter(m, a)
        pooled.append((a.unsqueeze(-1) * vt[m]).sum(0))
    return torch.stack(pooled), att, s


def make(temperature=1.0, dtype=torch.float64):
    pool = CASiiAggregation(D, torch.randn(TAU, D), hidden_channels=DH, temperature=temperature).to(dtype)
    x = torch.randn(17, D, dtype=dtype)
    index = torch.tensor([0] * 5 + [1] * 1 + [2] * 11)
    return pool, x, index


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("path", ["attend", "attend_explicit"])
def test_matches_reference_values_and_gradients(temperature, path):
    pool, x, index = make(temperature)
    x.requires_grad_(True)
    params = [x] + list(pool.parameters())
    g1, g2, g3 = torch.randn(3, DH, dtype=x.dtype), torch.randn(17, dtype=x.dtype), torch.randn(17, dtype=x.dtype)

    out = getattr(pool, path)(x, index, dim_size=3)
    ref = reference(pool, x, index, 3)
    for got, want in zip((out.pooled, out.attention, out.logits), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    loss = lambda p, a, s: (p * g1).sum() + (a * g2).sum() + (s * g3).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(out.pooled, out.attention, out.logits), params)
    grads_ref = torch.autograd.grad(loss(*ref), params)
    assert len(params) == 1 + 8  # x, 3 x (weight, bias), w_s, b_s
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-11)


def test_folded_equals_explicit_float32():
    pool, x, index = make(dtype=torch.float32)
    a, b = pool.attend(x, index), pool.attend_explicit(x, index)
    for u, v in zip(a[:3], b[:3]):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    assert pool.similarity(x).shape == (17, TAU)


def test_batched_equals_per_bag_and_index_equals_ptr():
    pool, x, index = make()
    out = pool.attend(x, index, dim_size=3)
    ptr = index_to_ptr(index, 3)
    out_ptr = pool.attend(x, ptr=ptr)
    torch.testing.assert_close(out.pooled, out_ptr.pooled)
    torch.testing.assert_close(out.attention, out_ptr.attention)
    torch.testing.assert_close(pool(x, index, dim_size=3), out.pooled)
    for b in range(3):
        m = index == b
        one = pool.attend(x[m])
        torch.testing.assert_close(one.pooled[0], out.pooled[b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(one.attention, out.attention[m], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(float(out.attention[m].sum().detach()), 1.0)
    perm = torch.randperm(17)
    outp = pool.attend(x[perm], index[perm], dim_size=3)
    torch.testing.assert_close(outp.pooled, out.pooled)
    torch.testing.assert_close(outp.logits, out.logits[perm])


def test_empty_bag_gets_zero_embedding():
    pool, x, index = make()
    out = pool.attend(x, index + 1, dim_size=4)
    assert torch.all(out.pooled[0] == 0) and not torch.isnan(out.pooled).any()


def test_set_keys_resizes_saliency_weight():
    pool = CASiiAggregation(D, hidden_channels=DH)
    assert pool.num_keys == 0 and pool.saliency_weight.shape == (0,)
    with pytest.raises(ValueError, match="no 'keys' set"):
        pool(torch.randn(3, D))
    pool.set_keys(torch.randn(5, D))
    assert pool.keys.shape == (5, D) and pool.saliency_weight.shape == (5,)
    w = pool.saliency_weight
    pool.set_keys(torch.randn(5, D))  # same size: same Parameter object, re-initialised
    assert pool.saliency_weight is w
    pool.set_keys(torch.randn(20, D).double())
    assert pool.saliency_weight.shape == (20,) and pool.keys.dtype == torch.float32
    assert "keys" in dict(pool.named_buffers()) and "keys" not in dict(pool.named_parameters())
    with pytest.raises(ValueError, match="'keys' must be"):
        pool.set_keys(torch.randn(5, D + 1))
    with pytest.raises(ValueError, match="NaN"):
        pool.set_keys(torch.full((2, D), float("nan")))
    with pytest.raises(ValueError, match="features"):
        pool(torch.randn(3, D + 2))


def test_state_dict_round_trip_with_different_tau():
    pool, x, index = make(dtype=torch.float32)
    sd = pool.state_dict()
    assert torch.equal(sd["keys"], pool.keys)
    for other in (CASiiAggregation(D, hidden_channels=DH),                       # no keys
                  CASiiAggregation(D, torch.randn(50, D), hidden_channels=DH)):  # tau = 50
        other.load_state_dict(sd)
        assert torch.equal(other.keys, pool.keys)
        assert torch.equal(other.saliency_weight, pool.saliency_weight)
        torch.testing.assert_close(other.attend(x, index).pooled, pool.attend(x, index).pooled, rtol=0, atol=0)
    bad = CASiiAggregation(D + 1, hidden_channels=DH)
    with pytest.raises(RuntimeError, match="size mismatch"):
        bad.load_state_dict(sd)


def test_bad_arguments_and_repr():
    with pytest.raises(ValueError, match="'temperature'"):
        CASiiAggregation(D, temperature=0)
    with pytest.raises(ValueError, match="'keys' must be"):
        CASiiAggregation(D, torch.randn(3))
    pool = CASiiAggregation(D, torch.randn(4, D), hidden_channels=DH, temperature=2.0)
    assert repr(pool) == "CASiiAggregation(12, num_keys=4, hidden_channels=6, temperature=2.0)"
    assert pool.in_channels == D and pool.hidden_channels == DH and pool.temperature == 2.0
