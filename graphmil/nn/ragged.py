r"""Ragged attention: softmax attention within segments of a flat sequence, without padding to the
longest segment and without any ``N_max × N_max`` mask.

The segments are bags (:class:`~graphmil.nn.transformer.BagSelfAttention`) or AINet regions with
their key sets (:class:`~graphmil.nn.anchor.AnchorRegionCorrection`). The CPU kernel is
PyTorch's fused flash attention (``scaled_dot_product_attention``) run on **size buckets**:
segments whose query and key lengths fall in the same power-of-two range are stacked and padded
only to that bucket's longest segment, with a key-padding mask ``[S, 1, 1, M_k]``. The work is at
most 4× :math:`\sum_s n_s m_s` (2× per length) and the memory :math:`O((N_q + N_k) H d)`; the Python
loop runs over the (at most :math:`(\log_2 N_{\max} + 1)^2`) occupied buckets, never over segments.
On CUDA the segments go to the fused variable-length kernels through nested jagged tensors.
See ``docs/benchmarks/attention.md`` for the candidates that were measured.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["ragged_attention", "ranges_to_index"]

# Largest number of attention scores (per block) the dropout path materialises at once; PyTorch's
# CPU flash kernel has no dropout, so attention dropout runs on the math kernel, one checkpointed
# block of queries at a time (2**22 float32 scores = 16 MiB per temporary).
MAX_BLOCK_SCORES = 1 << 22


def ranges_to_index(start: Tensor, length: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Concatenate index ranges, row by row: row ``s`` of the result is
    :math:`[\,\mathrm{start}_{s,0} + 0..\mathrm{length}_{s,0}-1,\ \mathrm{start}_{s,1} + 0..,\ \dots]`.

    Args:
        start (Tensor): first index of every range ``[S, P]`` (long).
        length (Tensor): length of every range ``[S, P]`` (long, ``>= 0``; ``0`` = no range).

    Returns:
        ``(index [T], ptr [S+1])`` with :math:`T = \sum \mathrm{length}`; row ``s`` is
        ``index[ptr[s]:ptr[s+1]]``.

    Example:
        >>> ranges_to_index(torch.tensor([[0, 10], [5, 0]]), torch.tensor([[2, 1], [3, 0]]))
        (tensor([ 0,  1, 10,  5,  6,  7]), tensor([0, 3, 6]))
    """
    if start.shape != length.shape or start.dim() != 2:
        raise ValueError(f"ranges_to_index: 'start' and 'length' must both be [S, P], got "
                         f"{tuple(start.shape)} and {tuple(length.shape)}")
    ptr = torch.cat([length.new_zeros(1), length.sum(1).cumsum(0)])
    start, length = start.reshape(-1), length.reshape(-1)
    off = length.cumsum(0) - length  # first output position of every range
    total = int(length.sum()) if length.numel() else 0
    piece = torch.repeat_interleave(torch.arange(length.numel(), device=length.device), length,
                                    output_size=total)
    index = start[piece] + torch.arange(total, device=length.device) - off[piece]
    return index, ptr


def _ceil_log2(n: Tensor) -> Tensor:
    # exact for the integer sizes of a batch: log2 of a power of two is exact in float64
    return torch.ceil(torch.log2(n.to(torch.float64))).long()


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float, scale: Optional[float],
          max_block_scores: int) -> Tensor:
    """SDPA on one bucket ``[S, H, M, d]``; with dropout, checkpointed blocks of queries."""
    if dropout_p == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    S, H, Mq, _ = q.shape
    Mk = k.size(2)
    tq = max(1, min(Mq, max_block_scores // max(1, S * H * Mk)))
    sc = S if tq > 1 or S * H * Mk <= max_block_scores else max(1, max_block_scores // max(1, H * Mk))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)

    def block(qb: Tensor, kb: Tensor, vb: Tensor, mb: Optional[Tensor]) -> Tensor:
        return F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mb, dropout_p=dropout_p, scale=scale)

    if tq >= Mq and sc >= S:
        return block(q, k, v, mask)
    rows: List[Tensor] = []
    for s0 in range(0, S, sc):  # fixed-size blocks of the score budget (one block unless S*H*M_k is huge)
        kb, vb = k[s0:s0 + sc], v[s0:s0 + sc]
        mb = None if mask is None else mask[s0:s0 + sc]
        cols = []
        for t0 in range(0, Mq, tq):  # fixed-size query blocks
            qb = q[s0:s0 + sc, :, t0:t0 + tq]
            # recomputed in backward with the same RNG state, hence the same dropout mask
            cols.append(checkpoint(block, qb, kb, vb, mb, use_reentrant=False) if grad else block(qb, kb, vb, mb))
        rows.append(torch.cat(cols, 2))
    return torch.cat(rows, 0)


def _bucketed(query: Tensor, key: Tensor, value: Tensor, ptr: Tensor, key_ptr: Tensor,
              key_index: Optional[Tensor], dropout_p: float, scale: Optional[float],
              max_block_scores: int) -> Tensor:
    Nq, H, _ = query.shape
    dv = value.size(-1)
    device = query.device
    nq, nk = ptr[1:] - ptr[:-1], key_ptr[1:] - key_ptr[:-1]
    seg = ((nq > 0) & (nk > 0)).nonzero().view(-1)  # segments with queries and keys
    out = query.new_zeros(Nq, H, dv)
    if seg.numel() == 0:
        return out
    lq, lk = nq[seg], nk[seg]
    bucket = _ceil_log2(lq) * 64 + _ceil_log2(lk)
    order = torch.argsort(bucket, stable=True)
    seg, lq, lk, bucket = seg[order], lq[order], lk[order], bucket[order]
    _, counts = torch.unique_consecutive(bucket, return_counts=True)
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    size = (counts.numel(),)
    mq = lq.new_zeros(size).scatter_reduce_(0, group, lq, "amax", include_self=False)
    mk = lk.new_zeros(size).scatter_reduce_(0, group, lk, "amax", include_self=False)
    kmin = lk.new_zeros(size).scatter_reduce_(0, group, lk, "amin", include_self=False)
    qmin = lq.new_zeros(size).scatter_reduce_(0, group, lq, "amin", include_self=False)
    first = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])  # first segment of every bucket
    meta = torch.stack([counts, mq, mk, qmin, kmin, ptr[seg[first]], key_ptr[seg[first]]], 1).tolist()  # 1 sync
    splits = [m[0] for m in meta]
    rows, vals = [], []
    for (S, Mq, Mk, qmin_b, kmin_b, q0, k0), s, a, b in zip(meta, seg.split(splits), lq.split(splits), lk.split(splits)):
        jq = torch.arange(Mq, device=device)
        if S == 1:  # one segment (e.g. a large bag alone in its bucket): views, no gather, no mask
            kb = key[k0:k0 + Mk] if key_index is None else key[key_index[k0:k0 + Mk]]
            vb = value[k0:k0 + Mk] if key_index is None else value[key_index[k0:k0 + Mk]]
            o = _sdpa(query[q0:q0 + Mq].unsqueeze(0).transpose(1, 2), kb.unsqueeze(0).transpose(1, 2),
                      vb.unsqueeze(0).transpose(1, 2), None, dropout_p, scale, max_block_scores)
            rows.append(jq + q0)
            vals.append(o[0].transpose(0, 1))
            continue
        qvalid = jq < a[:, None]  # [S, Mq]
        qrows = torch.where(qvalid, ptr[s][:, None] + jq, ptr[s][:, None])  # padding: the first row
        jk = torch.arange(Mk, device=device)
        kvalid = jk < b[:, None]
        krows = torch.where(kvalid, key_ptr[s][:, None] + jk, key_ptr[s][:, None])
        if key_index is not None:
            krows = key_index[krows]
        mask = None if kmin_b == Mk else kvalid.view(S, 1, 1, Mk)
        o = _sdpa(query[qrows].transpose(1, 2), key[krows].transpose(1, 2), value[krows].transpose(1, 2),
                  mask, dropout_p, scale, max_block_scores)  # [S, H, Mq, dv]
        o = o.transpose(1, 2)
        if qmin_b == Mq:
            rows.append(qrows.reshape(-1))
            vals.append(o.reshape(S * Mq, H, dv))
        else:
            rows.append(qrows[qvalid])
            vals.append(o[qvalid])
    return out.index_copy(0, torch.cat(rows), torch.cat(vals))


def _nested(query: Tensor, key: Tensor, value: Tensor, ptr: Tensor, key_ptr: Tensor,
            key_index: Optional[Tensor], dropout_p: float, scale: Optional[float]) -> Tensor:
    """Nested jagged tensors into SDPA (flash / memory-efficient varlen kernels on CUDA)."""
    if key_index is not None:
        key, value = key[key_index], value[key_index]

    def jag(t: Tensor, offsets: Tensor) -> Tensor:
        return torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets).transpose(1, 2)  # [B, H, j, d]

    o = F.scaled_dot_product_attention(jag(query, ptr), jag(key, key_ptr), jag(value, key_ptr),
                                       dropout_p=dropout_p, scale=scale)
    return o.transpose(1, 2).values()


def _cuda_varlen(query: Tensor, key: Tensor, value: Tensor, ptr: Tensor, key_ptr: Tensor,
                 key_index: Optional[Tensor], dropout_p: float, scale: Optional[float]) -> Optional[Tensor]:
    """The fused varlen path on CUDA, or ``None`` where no fused kernel takes the input (never
    PyTorch's math fallback for nested tensors, which pads every segment to the longest)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    nq, nk = ptr[1:] - ptr[:-1], key_ptr[1:] - key_ptr[:-1]
    if bool(((nq > 0) & (nk == 0)).any()):
        return None  # queries without keys: the bucketed path returns zeros for them
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            return _nested(query, key, value, ptr, key_ptr, key_index, dropout_p, scale)
    except (RuntimeError, ValueError, NotImplementedError):
        return None


def ragged_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    ptr: Tensor,
    key_ptr: Optional[Tensor] = None,
    key_index: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    max_block_scores: int = MAX_BLOCK_SCORES,
) -> Tensor:
    r"""Multi-head scaled dot-product attention (Vaswani et al., NeurIPS 2017) within segments of
    a flat sequence: the queries of segment :math:`s` attend only to the keys of segment :math:`s`.

    For a query :math:`i` of segment :math:`s` with key set :math:`\mathcal K_s` and head :math:`h`:

    .. math::
        o_{i,h} = \sum_{j \in \mathcal K_s}
            \frac{\exp(\tau\, q_{i,h}^\top k_{j,h})}{\sum_{l \in \mathcal K_s} \exp(\tau\, q_{i,h}^\top k_{l,h})}\,
            v_{j,h}, \qquad \tau = \texttt{scale} \ (\text{default } 1/\sqrt d),

    with dropout of rate ``dropout_p`` on the attention weights (pass ``0.0`` outside training).
    The queries of segment :math:`s` are ``query[ptr[s]:ptr[s+1]]``; its keys are
    ``key[key_ptr[s]:key_ptr[s+1]]`` or, with ``key_index``, ``key[key_index[key_ptr[s]:key_ptr[s+1]]]``
    (a key may then serve several segments, or one segment twice). ``key_ptr=None`` is
    self-attention (``key_ptr = ptr``). Queries of a segment without keys get zeros.

    No padding to the longest segment and no mask of size :math:`N_{\max}^2`: on CPU, segments are
    stacked in power-of-two size buckets for PyTorch's fused flash kernel (work at most
    :math:`4\sum_s n_s m_s`, memory :math:`O(N H d)` in forward and backward); with dropout, which
    that kernel lacks, the math kernel runs on checkpointed blocks of at most ``max_block_scores``
    scores. On CUDA, nested jagged tensors reach the fused varlen kernels (bucketed path otherwise).

    Args:
        query (Tensor): queries in segment order ``[N_q, H, d]``.
        key (Tensor): keys ``[N_k, H, d]``.
        value (Tensor): values ``[N_k, H, d_v]``.
        ptr (Tensor): query segment boundaries ``[S+1]`` (``ptr[0] = 0``, ``ptr[-1] = N_q``).
        key_ptr (Tensor, optional): key segment boundaries ``[S+1]`` (default: ``ptr``).
        key_index (Tensor, optional): rows of ``key``/``value`` listed per segment ``[T]``
            (default: the rows themselves, in order).
        dropout_p (float): attention dropout rate (default ``0.0``).
        scale (float, optional): :math:`\tau` (default :math:`1/\sqrt d`).
        max_block_scores (int): scores per block on the dropout path (default ``2**22``).

    Shapes:
        ``query [N_q, H, d]``, ``key [N_k, H, d]``, ``value [N_k, H, d_v]``, ``ptr [S+1]`` →
        ``[N_q, H, d_v]``.

    Example:
        >>> q = torch.randn(5, 2, 8)
        >>> ragged_attention(q, q, q, torch.tensor([0, 2, 5])).shape
        torch.Size([5, 2, 8])
    """
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise ValueError(f"ragged_attention: expected query, key, value of shape [N, H, d], got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if key.shape[:2] != value.shape[:2] or key.shape[1:] != query.shape[1:]:
        raise ValueError(f"ragged_attention: shapes do not match: query {tuple(query.shape)}, key "
                         f"{tuple(key.shape)}, value {tuple(value.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"ragged_attention: 'dropout_p' must be in [0, 1), got {dropout_p}")
    if key_ptr is None:
        if key_index is None and key.size(0) != query.size(0):
            raise ValueError("ragged_attention: self-attention (key_ptr=None) needs as many keys as queries")
        key_ptr = ptr
    if key_ptr.numel() != ptr.numel():
        raise ValueError(f"ragged_attention: 'ptr' and 'key_ptr' give {ptr.numel() - 1} and "
                         f"{key_ptr.numel() - 1} segments")
    if query.size(0) == 0 or ptr.numel() < 2:
        return query.new_zeros(query.size(0), query.size(1), value.size(-1))
    if query.is_cuda:
        out = _cuda_varlen(query, key, value, ptr, key_ptr, key_index, dropout_p, scale)
        if out is not None:
            return out
    return _bucketed(query, key, value, ptr, key_ptr, key_index, dropout_p, scale, max_block_scores)
