import math

import pytest
import torch
import torch.nn.functional as F

import graphmil.nn.ragged as ragged
from graphmil.nn.ragged import ragged_attention, ranges_to_index

# float64 throughout: the fused kernel accumulates its softmax block by block (online rescaling),
# a different summation order from the dense reference; in float64 that reordering costs ~1e-15
# relative, so torch's default float64 tolerances (rtol 1e-7, atol 1e-7) are ample.
DT = torch.float64


def reference(q, k, v, ptr, key_ptr=None, key_index=None, scale=None):
    """Dense softmax(QK^T * scale) V, one segment at a time (explicit loop, torch.softmax)."""
    key_ptr = ptr if key_ptr is None else key_ptr
    H, d = q.shape[1:]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = q.new_zeros(q.size(0), H, v.size(-1))
    for s in range(ptr.numel() - 1):
        qs = q[ptr[s]:ptr[s + 1]]
        rows = torch.arange(int(key_ptr[s]), int(key_ptr[s + 1]))
        if key_index is not None:
            rows = key_index[rows]
        if qs.size(0) == 0 or rows.numel() == 0:
            continue
        ks, vs = k[rows], v[rows]
        heads = []
        for h in range(H):
            a = torch.softmax(qs[:, h] @ ks[:, h].T * scale, dim=-1)
            heads.append(a @ vs[:, h])
        out[ptr[s]:ptr[s + 1]] = torch.stack(heads, 1)
    return out


def ptr_of(sizes):
    return torch.tensor([0] + sizes).cumsum(0)


def leaves(n, m, H=3, d=4, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, H, d, generator=g, dtype=DT, requires_grad=True)
    k = torch.randn(m, H, d, generator=g, dtype=DT, requires_grad=True)
    v = torch.randn(m, H, dv, generator=g, dtype=DT, requires_grad=True)
    return q, k, v


def check(fn, ref, inputs):
    out, want = fn(), ref()
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), inputs, allow_unused=True)
    exp = torch.autograd.grad((want * g).sum(), inputs, allow_unused=True)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)
    return out


@pytest.mark.parametrize("sizes", [
    [5, 1, 9, 3, 1, 17, 64, 65, 2],  # uneven, 1-instance segments, several buckets, masks
    [40],  # one segment (B = 1)
    [1],
    [3, 0, 4, 0],  # empty segments
    [8, 8, 8],  # one bucket, equal sizes: no mask
])
def test_self_attention_equals_per_segment_dense(sizes):
    ptr = ptr_of(sizes)
    q, k, v = leaves(sum(sizes), sum(sizes), dv=4)
    check(lambda: ragged_attention(q, k, v, ptr), lambda: reference(q, k, v, ptr), (q, k, v))
    torch.testing.assert_close(ragged_attention(q, k, v, ptr, scale=0.3), reference(q, k, v, ptr, scale=0.3))


def test_cross_attention_with_key_index_duplicates_and_no_keys():
    nq, nk = [4, 1, 6, 2, 3], [7, 3, 1, 0, 12]  # segment 3 has queries but no keys
    ptr, key_ptr = ptr_of(nq), ptr_of(nk)
    q, k, v = leaves(sum(nq), 9)
    g = torch.Generator().manual_seed(1)
    key_index = torch.randint(0, 9, (sum(nk),), generator=g)  # keys shared and repeated
    out = check(lambda: ragged_attention(q, k, v, ptr, key_ptr, key_index=key_index),
                lambda: reference(q, k, v, ptr, key_ptr, key_index), (q, k, v))
    assert torch.equal(out[11:13], torch.zeros_like(out[11:13]))
    # contiguous keys (no key_index)
    _, k2, v2 = leaves(1, sum(nk), seed=2)
    check(lambda: ragged_attention(q, k2, v2, ptr, key_ptr), lambda: reference(q, k2, v2, ptr, key_ptr), (q, k2, v2))


def test_float32_matches_reference():
    sizes = [300, 1, 17, 64, 129]
    ptr = ptr_of(sizes)
    q, k, v = (t.detach().float().requires_grad_() for t in leaves(sum(sizes), sum(sizes)))
    out = ragged_attention(q, k, v, ptr)
    want = reference(q.double(), k.double(), v.double(), ptr)
    # float32 rounding of 300-term dot products and sums: ~1e-6 relative
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_buckets_pad_only_to_their_own_longest(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), None if attn_mask is None else tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(ragged.F, "scaled_dot_product_attention", spy)
    sizes = [1000, 3, 2, 4, 1]
    ptr = ptr_of(sizes)
    q, k, v = leaves(sum(sizes), sum(sizes))
    ragged_attention(q, k, v, ptr)
    assert sorted(calls) == sorted([
        ((1, 3, 1000, 4), (1, 3, 1000, 4), None),  # the large bag alone, unmasked
        ((1, 3, 1, 4), (1, 3, 1, 4), None),
        ((1, 3, 2, 4), (1, 3, 2, 4), None),
        ((2, 3, 4, 4), (2, 3, 4, 4), (2, 1, 1, 4)),  # sizes 3 and 4 share the bucket (2, 4]: key mask
    ])


def _flash_in_graph(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if "FlashAttention" in type(f).__name__:
            return True
        stack.extend(g for g, _ in f.next_functions)
    return False


def test_cpu_uses_the_fused_flash_kernel():
    sizes = [50, 3, 9]
    ptr = ptr_of(sizes)
    q, k, v = (t.detach().float().requires_grad_() for t in leaves(sum(sizes), sum(sizes), dv=4))
    assert _flash_in_graph(ragged_attention(q, k, v, ptr))


@pytest.fixture
def one_thread():
    # many tiny ops (gradcheck, 400 draws): with 2 OpenMP threads on a busy 2-core machine each op
    # can wait on spinning threads (30x slower measured); one thread is as fast when idle
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_dropout_blocks_are_consistent_and_unbiased(one_thread):
    sizes = [5, 1, 2, 2, 2]  # 5: query blocks; the three 2s exceed the budget together: chunks of segments
    ptr = ptr_of(sizes)
    q, k, v = leaves(sum(sizes), sum(sizes), H=2, d=2, dv=2)

    def f(q, k, v):
        torch.manual_seed(0)  # same dropout mask at every call of gradcheck
        return ragged_attention(q, k, v, ptr, dropout_p=0.3, max_block_scores=10)  # several blocks

    out = f(q, k, v)
    assert not torch.allclose(out, ragged_attention(q, k, v, ptr))
    # the checkpointed blocks recompute the same mask in backward: exact gradients
    assert torch.autograd.gradcheck(f, (q, k, v))
    # E[dropout(A)] = A: the mean over draws approaches the deterministic output
    with torch.no_grad():
        mean = torch.stack([ragged_attention(q, k, v, ptr, dropout_p=0.3, max_block_scores=10)
                            for _ in range(400)]).mean(0)
    assert (mean - ragged_attention(q, k, v, ptr)).abs().mean() < 0.03


def test_nested_jagged_path_on_cpu_equals_bucketed():
    # the CUDA varlen path packs nested jagged tensors; on CPU the same packing runs on the math
    # kernel (which pads: small sizes only), checking offsets, layouts and the key_index gather
    nq, nk = [4, 1, 6], [5, 2, 7]
    ptr, key_ptr = ptr_of(nq), ptr_of(nk)
    q, k, v = leaves(sum(nq), 10)
    key_index = torch.randint(0, 10, (sum(nk),))
    got = ragged._nested(q, k, v, ptr, key_ptr, key_index, 0.0, None)
    torch.testing.assert_close(got, ragged_attention(q, k, v, ptr, key_ptr, key_index=key_index))


def test_ranges_to_index_and_errors():
    idx, p = ranges_to_index(torch.tensor([[0, 10], [5, 0], [2, 2]]), torch.tensor([[2, 1], [3, 0], [0, 0]]))
    assert idx.tolist() == [0, 1, 10, 5, 6, 7] and p.tolist() == [0, 3, 6, 6]
    q = torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match="shape"):
        ragged_attention(q[:, 0], q, q, ptr_of([4]))
    with pytest.raises(ValueError, match="dropout_p"):
        ragged_attention(q, q, q, ptr_of([4]), dropout_p=1.0)
    with pytest.raises(ValueError, match="segments"):
        ragged_attention(q, q, q, ptr_of([4]), ptr_of([2, 2]))
    with pytest.raises(ValueError, match="as many keys"):
        ragged_attention(q, q[:3], q[:3], ptr_of([4]))
    assert ragged_attention(q[:0], q, q, torch.zeros(1, dtype=torch.long), torch.tensor([0])).shape == (0, 2, 3)


def test_benchmark_reference_copies_equal_the_new_layers():
    # benchmarks/attention.py keeps the old padded implementations; they must compute the same
    # function as the layers they are compared with (float32: ~1e-7 differences of summation order)
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    for kind in ("bag", "arc"):
        res = bench.child(dict(kind=kind, path="old", sizes=[70, 9, 1, 20], warmup=0, reps=1, threads=1,
                               backward=True, compare=True, regions=3))
        assert res["max_diff"] < 1e-5 and res["time_s"] > 0, (kind, res)
    for key in ("bucket", "blockwise", "pad_key"):
        assert bench.child(dict(kind="kernel", path=key, sizes=[300, 7, 1], warmup=0, reps=1, threads=1,
                                backward=True))["time_s"] > 0
    torch.set_num_threads(threads)  # child() sets the thread count
    sizes = [300, 7, 1, 64]
    ptr = ptr_of(sizes)
    q, k, v = (t.detach().float() for t in leaves(sum(sizes), sum(sizes), dv=4))
    want = ragged_attention(q, k, v, ptr)
    for fn in (bench._cand_blockwise, bench._cand_pad_key, bench._cand_njt):
        torch.testing.assert_close(fn(q, k, v, ptr), want, rtol=1e-5, atol=1e-5)
