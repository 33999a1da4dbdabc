import math

import pytest
import torch
from torch_geometric.utils import erdos_renyi_graph, to_undirected

from graphmil.nn import BagSelfAttention, SmTransformerEncoder
from graphmil.nn.conv import SmConv


def reference_mhsa(att, x, index, B):
    """Dense per-bag multi-head attention written out by hand with the module's weights."""
    C, H = att.channels, att.heads
    d = C // H
    W, b = att.qkv.weight, att.qkv.bias
    out = torch.empty_like(x)
    for g in range(B):
        m = index == g
        if m.sum() == 0:
            continue
        xb = x[m]
        qkv = xb @ W.T + b
        q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
        heads = []
        for h in range(H):
            s = slice(h * d, (h + 1) * d)
            a = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(d), -1)
            heads.append(a @ v[:, s])
        o = torch.cat(heads, -1)
        if att.proj is not None:
            o = att.proj(o)
        out[m] = o
    return out


@pytest.mark.parametrize("out_proj", [True, False])
def test_bag_self_attention_equals_per_bag_dense(out_proj):
    att = BagSelfAttention(16, heads=4, out_proj=out_proj).double()
    index = torch.tensor([0] * 5 + [1] * 1 + [2] * 9 + [3] * 3)
    x = torch.randn(index.numel(), 16, dtype=torch.float64)
    out = att(x, index)
    torch.testing.assert_close(out, reference_mhsa(att, x, index, 4))
    ptr = torch.tensor([0, 5, 6, 15, 18])
    torch.testing.assert_close(att(x, ptr=ptr), out)


def test_unsorted_and_permuted_batch():
    att = BagSelfAttention(8, heads=2).double()
    index = torch.tensor([0] * 4 + [1] * 7 + [2] * 2)
    x = torch.randn(13, 8, dtype=torch.float64)
    out = att(x, index)
    perm = torch.randperm(13)
    out_p = att(x[perm], index[perm])
    torch.testing.assert_close(out_p, out[perm])
    torch.testing.assert_close(out_p, reference_mhsa(att, x[perm], index[perm], 3))


def test_no_attention_across_bags_and_empty_bag():
    att = BagSelfAttention(8, heads=2).double()
    index = torch.tensor([0, 0, 0, 2, 2])  # bag 1 is empty
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    out = att(x, index, dim_size=3)
    out[:3].sum().backward()
    assert torch.all(x.grad[3:] == 0)  # bag 0 does not see bag 2
    assert torch.isfinite(x.grad).all()


def test_encoder_matches_hand_written_layers():
    torch.manual_seed(1)
    enc = SmTransformerEncoder(16, heads=4, num_layers=2, K=10).double()
    index = torch.tensor([0] * 6 + [1] * 5)
    ei = torch.cat([to_undirected(erdos_renyi_graph(6, 0.5), num_nodes=6),
                    to_undirected(erdos_renyi_graph(5, 0.5), num_nodes=5) + 6], 1)
    x = torch.randn(11, 16, dtype=torch.float64)
    out = enc(x, ei, index)
    z = x
    for l in range(2):
        h = reference_mhsa(enc.attns[l], enc.norms[l](z), index, 2)
        z = enc.sms[l](h, ei, batch=index) + z
    torch.testing.assert_close(out, enc.final_norm(z))
    assert enc.attns[0].proj is None  # SmTAP has no output projection
    assert len(list(enc.sms)) == 2 and enc.sms[0].theta is not enc.sms[1].theta
    # the Sm in the encoder is the SmConv of this package
    assert isinstance(enc.sms[0], SmConv)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_encoder_without_sm_and_errors():
    enc = SmTransformerEncoder(8, heads=2, num_layers=1, use_sm=False)
    assert enc(torch.randn(4, 8)).shape == (4, 8)
    with pytest.raises(ValueError, match="edge_index"):
        SmTransformerEncoder(8, heads=2)(torch.randn(4, 8))
    with pytest.raises(ValueError, match="heads"):
        BagSelfAttention(10, heads=3)
    assert "heads=2" in repr(enc) and "out_proj=True" in repr(BagSelfAttention(9, heads=3))


# Gradients of the ragged (bucketed flash) path against the per-bag dense reference. float64: the
# fused kernel sums its online softmax block by block, a different order from torch.softmax; the
# reordering costs ~1e-15 relative in float64, far inside torch's default float64 tolerances.
def _grads(out, g, x, module):
    params = [p for p in module.parameters()]
    return torch.autograd.grad((out * g).sum(), [x] + params)


@pytest.mark.parametrize("out_proj", [True, False])
@pytest.mark.parametrize("sizes,permute", [
    ([5, 1, 9, 3, 1, 17, 40], False),  # uneven, 1-instance bags, several buckets
    ([5, 1, 9, 3, 1, 17, 40], True),  # the same bags given in a permuted (unsorted) order
    ([33], False),  # B = 1
    ([1], False),
])
def test_forward_and_gradients_equal_per_bag_dense(out_proj, sizes, permute):
    torch.manual_seed(0)
    att = BagSelfAttention(16, heads=4, out_proj=out_proj).double()
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if permute:
        index = index[torch.randperm(index.numel())]
    x = torch.randn(index.numel(), 16, dtype=torch.float64, requires_grad=True)
    out = att(x, index, dim_size=len(sizes))
    want = reference_mhsa(att, x, index, len(sizes))
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, g, x, att), _grads(want, g, x, att)):
        torch.testing.assert_close(a, b)
    if not permute:
        torch.testing.assert_close(att(x, ptr=torch.tensor([0] + sizes).cumsum(0)), out)


def test_no_padding_to_the_largest_bag(monkeypatch):
    import torch.nn.functional as F

    import graphmil.nn.ragged as ragged

    lengths = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        assert attn_mask is None or attn_mask.shape[-2] == 1  # key-padding mask only, never [M, M]
        lengths.append((q.size(0), q.size(2)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(ragged.F, "scaled_dot_product_attention", spy)
    index = torch.repeat_interleave(torch.arange(4), torch.tensor([3, 500, 4, 1]))
    BagSelfAttention(8, heads=2)(torch.randn(508, 8), index)
    assert sorted(lengths) == [(1, 1), (1, 500), (2, 4)]  # 3 and 4 share a bucket; none is padded to 500


def test_dropout_trains_and_gradients_are_exact():
    att = BagSelfAttention(4, heads=2, dropout=0.5, out_proj=False).double().train()
    index = torch.tensor([0, 0, 0, 1, 2, 2])
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        torch.manual_seed(3)
        return att(x, index)

    assert not torch.allclose(f(x), att.eval()(x, index))
    att.train()
    assert torch.autograd.gradcheck(f, (x,))
