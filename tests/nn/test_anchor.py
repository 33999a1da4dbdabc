import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch

from graphmil.data import make_bag
from graphmil.nn.anchor import (AINetFrontEnd, AnchorMining, AnchorRegionCorrection, dual_level_scores,
                                region_mask, region_neighbours)
from graphmil.transforms.regions import RegionPartition, global_region_index, grid_adjacency, kd_partition


def grid_bag(h, w, d=16, seed=0, y=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([xx.flatten(), yy.flatten()], 1) * 256
    keep = torch.rand(h * w, generator=g) > 0.15  # ragged tissue
    keep[0] = True
    pos = pos[keep]
    e = torch.from_numpy(grid_adjacency(pos))
    return make_bag(torch.randn(pos.size(0), d, generator=g), pos=pos, y=y, edge_index=e)


def make_batch(shapes=((6, 7), (3, 4), (8, 5), (1, 1)), d=16, num_regions=4):
    bags = [RegionPartition(num_regions)(grid_bag(h, w, d, seed=i, y=i % 2)) for i, (h, w) in enumerate(shapes)]
    return bags, Batch.from_data_list(bags)


def test_dual_level_scores_match_numpy():
    bags, batch = make_batch()
    region, R, _ = global_region_index(batch)
    r = torch.randn(batch.num_nodes, 16, dtype=torch.float64)
    s = dual_level_scores(r, region, batch.batch, beta=0.7, num_regions=R, num_bags=len(bags)).numpy()
    rn, reg, bt = r.numpy(), region.numpy(), batch.batch.numpy()
    want = np.empty(len(rn))
    for i in range(len(rn)):
        em = rn[reg == reg[i]].mean(0)
        eb = rn[bt == bt[i]].mean(0)
        cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        want[i] = 0.7 * cos(rn[i], em) + 0.3 * cos(rn[i], eb)
    np.testing.assert_allclose(s, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("anchors", ["region", "topk"])
def test_anchors_are_per_region_argmax_or_bag_topk(anchors):
    bags, batch = make_batch()
    region, R, region_batch = global_region_index(batch)
    dam = AnchorMining(16, anchors=anchors, k=None if anchors == "region" else 3)
    out = dam(batch.x, region, batch.batch, R, len(bags))
    torch.testing.assert_close(out.r, dam.phi[2](torch.relu(dam.phi[0](batch.x))))
    torch.testing.assert_close(out.score, dual_level_scores(out.r, region, batch.batch, 0.7, R, len(bags)))
    s = out.score.detach().numpy()
    if anchors == "region":
        want = sorted(int(np.flatnonzero(region.numpy() == m)[np.argmax(s[region.numpy() == m])]) for m in range(R))
    else:
        want = []
        for b in range(len(bags)):
            idx = np.flatnonzero(batch.batch.numpy() == b)
            want += idx[np.argsort(-s[idx], kind="stable")[:3]].tolist()
        want = sorted(want)
    assert out.anchor_index.tolist() == want
    assert torch.equal(out.anchor_batch, batch.batch[out.anchor_index])
    assert out.anchor_mask.sum() == len(want)


def reference_arc(arc, r, region, batch, anchor_index, R, neighbours):
    """Per-region dense multi-head attention with the module's own weights (tokens include the
    anchors as queries; the region rows are kept)."""
    D, H = arc.channels, arc.heads
    d = D // H
    out = torch.empty_like(r)
    for m in range(R):
        idx = (region == m).nonzero().view(-1)
        b = int(batch[idx[0]])
        anc = anchor_index[batch[anchor_index] == b]
        tokens = torch.cat([r[idx], r[anc]])
        key_rows = [r[idx]] + [r[region == j] for j in neighbours[m]] + [r[anc]]
        keys = torch.cat(key_rows)
        q = tokens @ arc.lin_q.weight.T + arc.lin_q.bias
        k = keys @ arc.lin_k.weight.T + arc.lin_k.bias
        v = keys @ arc.lin_v.weight.T + arc.lin_v.bias
        heads = []
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
            heads.append(a @ v[:, sl])
        o = torch.cat(heads, 1) @ arc.lin_out.weight.T + arc.lin_out.bias
        y = F.layer_norm(tokens + o, (D,), arc.norm.weight, arc.norm.bias, arc.norm.eps)
        out[idx] = y[: idx.numel()]
    return out


def reference_neighbours(bags, batch, region, region_batch, R, neighbour):
    """The neighbour regions of every region, independently of ``region_neighbours``."""
    nb = {}
    counts = [b.num_regions for b in bags]
    offs = np.cumsum([0] + counts)
    for m in range(R):
        b = int(region_batch[m])
        if neighbour == "next":
            j = offs[b] + (m - offs[b] + 1) % counts[b]
            nb[m] = [] if j == m else [int(j)]
        elif neighbour == "graph":
            s, t = region[batch.edge_index[0]], region[batch.edge_index[1]]
            nb[m] = sorted(set(t[(s == m) & (t != m)].tolist()))
        else:
            nb[m] = []
    return nb


@pytest.mark.parametrize("neighbour", ["next", "graph", None])
def test_arc_equals_per_region_dense_attention(neighbour):
    bags, batch = make_batch()
    region, R, region_batch = global_region_index(batch)
    B = len(bags)
    r = torch.randn(batch.num_nodes, 16)
    dam = AnchorMining(16)
    anchor_index = dam(r, region, batch.batch, R, B).anchor_index
    arc = AnchorRegionCorrection(16, heads=4, neighbour=neighbour)
    with torch.no_grad():
        arc.norm.weight.uniform_(0.5, 1.5)
        arc.norm.bias.normal_()
    got = arc(r, region, batch.batch, anchor_index, R, B, batch.edge_index)
    nb = reference_neighbours(bags, batch, region, region_batch, R, neighbour)
    want = reference_arc(arc, r, region, batch.batch, anchor_index, R, nb)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the graph neighbours are symmetric and within a bag
    if neighbour == "graph":
        nbr, valid = region_neighbours(region_batch, B, "graph", region, batch.edge_index)
        for m in range(R):
            assert sorted(nbr[m][valid[m]].tolist()) == nb[m]
            assert all(int(region_batch[j]) == int(region_batch[m]) for j in nb[m])


@pytest.mark.parametrize("rho", [0.3, 0.25, 0.5, 0.0, 0.9])
def test_region_mask_keeps_ceil_fraction_of_top_scores(rho):
    region = torch.repeat_interleave(torch.arange(6), torch.tensor([10, 1, 7, 20, 3, 13]))
    score = torch.randn(region.numel())
    keep = region_mask(score, region, rho)
    for m in range(6):
        sel = region == m
        n = int(sel.sum())
        want = math.ceil((1 - Fraction(str(rho))) * n)
        assert int(keep[sel].sum()) == want
        s = score[sel]
        if want < n:
            assert s[keep[sel]].min() > s[~keep[sel]].max()


def _per_bag(fe, bags, use_region):
    outs = []
    for bag in bags:
        b = Batch.from_data_list([bag])
        region = global_region_index(b)[0] if use_region else None
        outs.append(fe(b.x, b.batch, region=region, pos=b.pos, edge_index=b.edge_index, dim_size=1))
    return outs


@pytest.mark.parametrize("use_region", [True, False])
@pytest.mark.parametrize("neighbour", ["next", "graph"])
def test_front_end_batched_equals_per_bag(use_region, neighbour):
    bags, batch = make_batch(shapes=((6, 7), (3, 4), (8, 5), (2, 2), (1, 1)))
    fe = AINetFrontEnd(16, num_regions=4, heads=4, rho=0.3, neighbour=neighbour).eval()
    region = global_region_index(batch)[0] if use_region else None
    out = fe(batch.x, batch.batch, region=region, pos=batch.pos, edge_index=batch.edge_index,
             dim_size=len(bags))
    singles = _per_bag(fe, bags, use_region)
    torch.testing.assert_close(out.x, torch.cat([o.x for o in singles]), rtol=1e-4, atol=1e-5)
    assert torch.equal(out.batch, torch.cat([torch.full_like(o.batch, i) for i, o in enumerate(singles)]))
    offsets = np.cumsum([0] + [len(b.x) for b in bags])
    assert torch.equal(out.keep_index, torch.cat([o.keep_index + int(offsets[i]) for i, o in enumerate(singles)]))
    roff = np.cumsum([0] + [o.aux["region_batch"].numel() for o in singles])
    assert torch.equal(out.region, torch.cat([o.region + int(roff[i]) for i, o in enumerate(singles)]))
    # kept count per region = ceil(0.7 n)
    reg_all = out.aux["region"]
    for m in range(int(reg_all.max()) + 1):
        n = int((reg_all == m).sum())
        assert int((out.region == m).sum()) == math.ceil(Fraction(7, 10) * n)
    if not use_region:
        local, _ = kd_partition(batch.pos, batch.batch, 4, len(bags))
        assert torch.equal(out.aux["region"] - out.aux["region"].new_tensor(roff[:-1])[batch.batch], local)


def test_front_end_gradients_and_shared_scorer():
    bags, batch = make_batch()
    fe = AINetFrontEnd(16, num_regions=4, heads=4)
    out = fe(batch.x, batch.batch, pos=batch.pos, dim_size=len(bags))
    # a downstream pool using the scorer's attention reaches every parameter
    a = fe.scorer.attend(out.x, out.batch, dim_size=len(bags))
    (a.pooled.sum() + out.aux["consistency"]).backward()
    for name, p in fe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert "rho=0.3" in repr(fe) and "neighbour='next'" in repr(fe.arc)


def test_bad_input():
    with pytest.raises(ValueError, match="heads"):
        AnchorRegionCorrection(10, heads=4)
    with pytest.raises(ValueError, match="neighbour"):
        AnchorRegionCorrection(8, heads=4, neighbour="left")
    with pytest.raises(ValueError, match="anchors"):
        AnchorMining(8, anchors="all")
    with pytest.raises(ValueError, match="rho"):
        region_mask(torch.randn(3), torch.zeros(3, dtype=torch.long), rho=1.0)
    with pytest.raises(ValueError, match="beta"):
        dual_level_scores(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), beta=2.0)
    fe = AINetFrontEnd(8, heads=2)
    with pytest.raises(ValueError, match="pos"):
        fe(torch.randn(4, 8))
    with pytest.raises(ValueError, match="edge_index"):
        AnchorRegionCorrection(8, heads=2, neighbour="graph")(
            torch.randn(4, 8), torch.tensor([0, 0, 1, 1]), None, torch.tensor([0, 2]))


# ARC's ragged attention against the per-region dense reference, forward and gradients (w.r.t. the
# input and every weight), in float64: the fused kernel's blockwise online softmax sums in another
# order than torch.softmax, ~1e-15 relative in float64, inside torch's default float64 tolerances.
@pytest.mark.parametrize("neighbour", ["next", "graph", None])
@pytest.mark.parametrize("shapes,permute", [
    (((6, 7), (3, 4), (8, 5), (1, 1)), False),  # uneven regions, a 1-instance bag and region
    (((6, 7), (3, 4), (8, 5), (1, 1)), True),  # instances given in a permuted order
    (((9, 8),), False),  # B = 1
])
def test_arc_gradients_equal_per_region_dense(neighbour, shapes, permute):
    torch.manual_seed(0)
    bags, batch = make_batch(shapes=shapes)
    region, R, region_batch = global_region_index(batch)
    B, n = len(bags), batch.num_nodes
    nb = reference_neighbours(bags, batch, region, region_batch, R, neighbour)
    r = torch.randn(n, 16, dtype=torch.float64)
    anchor_index = AnchorMining(16).double()(r, region, batch.batch, R, B).anchor_index
    bt, ei = batch.batch, batch.edge_index
    if permute:
        perm = torch.randperm(n)
        inv = torch.empty_like(perm).index_copy_(0, perm, torch.arange(n))
        r, region, bt, ei, anchor_index = r[perm], region[perm], bt[perm], inv[ei], inv[anchor_index]
    assert (region == 0).sum() >= 1 and min(int((region == m).sum()) for m in range(R)) >= 1
    arc = AnchorRegionCorrection(16, heads=4, neighbour=neighbour).double()
    with torch.no_grad():
        arc.norm.weight.uniform_(0.5, 1.5)
        arc.norm.bias.normal_()
    r.requires_grad_()
    got = arc(r, region, bt, anchor_index, R, B, ei)
    want = reference_arc(arc, r, region, bt, anchor_index, R, nb)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    inputs = [r, *arc.parameters()]
    for a, b in zip(torch.autograd.grad((got * g).sum(), inputs), torch.autograd.grad((want * g).sum(), inputs)):
        torch.testing.assert_close(a, b)


def test_arc_has_no_region_padding_and_dropout_gradients(monkeypatch):
    import graphmil.nn.ragged as ragged

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.size(0), q.size(2), k.size(2)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(ragged.F, "scaled_dot_product_attention", spy)
    # two bags: one of a single 300-instance region, one of three 1-instance regions
    region = torch.repeat_interleave(torch.arange(4), torch.tensor([300, 1, 1, 1]))
    batch = torch.tensor([0] * 300 + [1] * 3)
    anchor_index = torch.tensor([0, 300, 301, 302])
    arc = AnchorRegionCorrection(8, heads=2, neighbour="next")
    arc(torch.randn(303, 8), region, batch, anchor_index, 4, 2)
    # region 0: 300 queries, keys = itself + 1 anchor (no neighbour); regions 1-3: 1 query,
    # keys = itself + next region + 3 anchors; never padded to the 300-instance region
    assert sorted(calls) == [(1, 300, 301), (3, 1, 5)]
    monkeypatch.undo()
    # attention dropout: the checkpointed blocks give exact gradients for a fixed seed
    arc = AnchorRegionCorrection(4, heads=2, dropout=0.5).double().train()
    region, batch = torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([0, 0, 0, 0, 0, 1])
    r = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def f(r):
        torch.manual_seed(5)
        return arc(r, region, batch, torch.tensor([1, 3, 5]), 3, 2)

    assert torch.autograd.gradcheck(f, (r,))
