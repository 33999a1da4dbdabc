"""AINet's anchor layers (Zheng et al.): dual-level anchor mining (DAM), anchor-guided region
correction (ARC), attention-based region masking, and the DAM + ARC front end ("+AINet").

Regions are segments of the instance set, like bags: a *global* region index ``region [N]`` with
ids ``0..R-1`` that are unique over the batch and ordered by ``(bag, region)`` (what
:func:`graphmil.ops.global_region_index` and :func:`graphmil.ops.kd_partition`
produce). Every operation below is a segment operation over ``region`` or ``batch``; ARC attends
within each region by ragged attention (no padding to the largest region) and equals the
per-region computation.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import LayerNorm, Linear, Module, ReLU, Sequential
from torch_geometric.utils import scatter, to_dense_batch

from graphmil.nn.aggr.attention import AttentionAggregation
from graphmil.nn.ragged import ragged_attention, ranges_to_index
from graphmil.utils import segment_count, segment_topk

__all__ = [
    "dual_level_scores",
    "region_mask",
    "region_neighbours",
    "AnchorOutput",
    "AnchorMining",
    "AnchorRegionCorrection",
    "FrontEndOutput",
    "AINetFrontEnd",
]

_NEIGHBOURS = ("next", "graph", None)


def _region_batch(region: Tensor, batch: Tensor, num_regions: int) -> Tensor:
    return scatter(batch, region, 0, num_regions, reduce="max")


def _num_regions(region: Tensor, num_regions: Optional[int]) -> int:
    if num_regions is not None:
        return int(num_regions)
    return int(region.max()) + 1 if region.numel() else 0


def dual_level_scores(
    r: Tensor,
    region: Tensor,
    batch: Optional[Tensor] = None,
    beta: float = 0.7,
    num_regions: Optional[int] = None,
    num_bags: Optional[int] = None,
    eps: float = 1e-8,
) -> Tensor:
    r"""DAM's dual-level instance score (AINet, Zheng et al.).

    .. math::
        e_m = \frac{1}{|R_m|}\sum_{j \in R_m} r_j, \qquad
        e_b = \frac{1}{|b|}\sum_{j \in b} r_j, \qquad
        s_i = \beta \cos(r_i, e_{m(i)}) + (1-\beta) \cos(r_i, e_{b(i)}),

    with :math:`\cos(a, b) = a^\top b / \max(\lVert a\rVert \lVert b\rVert, \epsilon)` (PyTorch's
    ``cosine_similarity``). Region and bag means are segment means (``scatter``).

    Args:
        r (Tensor): projected instances ``[N, D]``.
        region (Tensor): global region id ``[N]`` (unique over the batch).
        batch (Tensor, optional): bag index ``[N]``; ``None`` = one bag.
        beta (float): weight of the region term (default ``0.7``).
        num_regions (int, optional): number of regions ``R`` in the batch.
        num_bags (int, optional): number of bags ``B``.
        eps (float): cosine denominator floor (default ``1e-8``).

    Shapes:
        ``r [N, D]``, ``region [N]``, ``batch [N]`` → ``[N]``.
    """
    if r.dim() != 2 or region.shape != r.shape[:1]:
        raise ValueError(f"dual_level_scores: expected r [N, D] and region [N], got {tuple(r.shape)} "
                         f"and {tuple(region.shape)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"dual_level_scores: 'beta' must be in [0, 1], got {beta}")
    if batch is None:
        batch = torch.zeros_like(region)
        num_bags = 1
    num_regions = _num_regions(region, num_regions)
    num_bags = int(num_bags) if num_bags is not None else (int(batch.max()) + 1 if batch.numel() else 0)
    e_region = scatter(r, region, 0, num_regions, reduce="mean")
    e_bag = scatter(r, batch, 0, num_bags, reduce="mean")
    s_region = F.cosine_similarity(r, e_region.index_select(0, region), dim=-1, eps=eps)
    s_bag = F.cosine_similarity(r, e_bag.index_select(0, batch), dim=-1, eps=eps)
    return beta * s_region + (1.0 - beta) * s_bag


def region_mask(score: Tensor, region: Tensor, rho: float = 0.3, num_regions: Optional[int] = None) -> Tensor:
    r"""Attention-based masking (AINet): keep the highest-scoring
    :math:`\lceil (1-\rho)\, n_m \rceil` instances of every region.

    .. math::
        \text{keep}_i = \big[\operatorname{rank}_{R_{m(i)}}(s_i) < n_m - \lfloor \rho\, n_m \rfloor\big]

    (:math:`n - \lfloor \rho n\rfloor = \lceil (1-\rho) n \rceil`, computed in exact rational
    arithmetic on ``rho`` so that e.g. ``ρ = 0.3``, ``n = 10`` keeps 7). Hard selection by a segment
    top-k (no gradient through the ranking); ties broken by instance order. Every non-empty region
    keeps at least one instance when ``ρ < 1``.

    Args:
        score (Tensor): instance scores ``[N]`` (e.g. gated-attention logits).
        region (Tensor): global region id ``[N]``.
        rho (float): fraction dropped per region, in ``[0, 1)`` (default ``0.3``).
        num_regions (int, optional): ``R``.

    Returns:
        ``BoolTensor [N]`` (``True`` = kept).
    """
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"region_mask: 'rho' must be in [0, 1), got {rho}")
    if score.dim() != 1 or score.shape != region.shape:
        raise ValueError(f"region_mask: 'score' and 'region' must both be [N], got {tuple(score.shape)} "
                         f"and {tuple(region.shape)}")
    num_regions = _num_regions(region, num_regions)
    n = segment_count(region, num_regions)
    frac = Fraction(str(rho)) if isinstance(rho, float) else Fraction(rho)
    drop = (n * frac.numerator) // frac.denominator
    return segment_topk(score, region, n - drop, num_regions)


def region_neighbours(
    region_batch: Tensor,
    num_bags: int,
    mode: Optional[str] = "next",
    region: Optional[Tensor] = None,
    edge_index: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    r"""The neighbour regions ARC attends to, as a padded table.

    - ``'next'``: region :math:`m` of bag :math:`b` (local id :math:`\ell`) → the region with local id
      :math:`(\ell + 1) \bmod M_b` of the same bag; none when :math:`M_b = 1`.
    - ``'graph'``: every region joined to :math:`m` by an edge of ``edge_index`` (regions sharing a
      spatial-graph edge).
    - ``None``: no neighbour (the paper's "ACF" ablation).

    Args:
        region_batch (Tensor): bag of each region ``[R]`` (sorted).
        num_bags (int): ``B``.
        mode (str or None): ``'next'`` (default), ``'graph'`` or ``None``.
        region (Tensor, optional): global region id ``[N]`` (for ``'graph'``).
        edge_index (Tensor, optional): spatial edges ``[2, E]`` (for ``'graph'``).

    Returns:
        ``(nbr [R, K], valid [R, K])``: neighbour region ids (padding ``0``) and their mask.
    """
    R = region_batch.numel()
    device = region_batch.device
    if mode is None:
        return (torch.zeros(R, 0, dtype=torch.long, device=device),
                torch.zeros(R, 0, dtype=torch.bool, device=device))
    if mode == "next":
        m = segment_count(region_batch, num_bags)
        offset = torch.cat([m.new_zeros(1), m.cumsum(0)[:-1]])
        g = torch.arange(R, device=device)
        off = offset[region_batch]
        nb = off + (g - off + 1) % m[region_batch]
        return nb.view(R, 1), (nb != g).view(R, 1)
    if mode == "graph":
        if region is None or edge_index is None:
            raise ValueError("region_neighbours: neighbour='graph' needs 'region' and 'edge_index'")
        a, b = region[edge_index[0]], region[edge_index[1]]
        keep = a != b
        a, b = torch.cat([a[keep], b[keep]]), torch.cat([b[keep], a[keep]])
        key = torch.unique(a * R + b)  # sorted by (a, b)
        a, b = key // R, key % R
        nbr, valid = to_dense_batch(b, a, fill_value=0, batch_size=R)
        return nbr, valid
    raise ValueError(f"region_neighbours: 'mode' must be one of {_NEIGHBOURS}, got {mode!r}")


class AnchorOutput(NamedTuple):
    """What :class:`AnchorMining` computes.

    Attributes:
        r: projections ``φ(x)`` ``[N, D]``.
        score: dual-level scores ``[N]``.
        anchor_mask: ``BoolTensor [N]``, ``True`` for anchors.
        anchor_index: anchor rows ``[A]`` (ascending, hence grouped by bag for a sorted batch).
        anchor_batch: bag of each anchor ``[A]``.
    """

    r: Tensor
    score: Tensor
    anchor_mask: Tensor
    anchor_index: Tensor
    anchor_batch: Tensor


class AnchorMining(Module):
    r"""Dual-level anchor mining, DAM (AINet, Zheng et al.).

    .. math::
        r_i = \phi(x_i) = W_2\,\mathrm{ReLU}(W_1 x_i + b_1) + b_2, \qquad
        s_i = \beta \cos(r_i, e_{m(i)}) + (1-\beta)\cos(r_i, e_{b(i)})

    (:func:`dual_level_scores`). Anchors (hard, no gradient through the ranking):

    - ``anchors='region'`` (default): :math:`\arg\max_{i \in R_m} s_i` for every region
      (``M_b`` anchors per bag);
    - ``anchors='topk'``: the global top-``k`` of each bag (``k = M_b`` when ``k`` is ``None``).

    Args:
        in_channels (int): ``D`` (``φ`` maps ``D → D``).
        beta (float): weight of the region-level cosine (default ``0.7``).
        anchors (str): ``'region'`` (default) or ``'topk'``.
        k (int, optional): anchors per bag for ``'topk'`` (default: the bag's number of regions).

    Shapes:
        - **input:** ``x [N, D]``, ``region [N]`` (global ids), ``batch [N]``.
        - **output:** :class:`AnchorOutput`.
    """

    def __init__(self, in_channels: int, beta: float = 0.7, anchors: str = "region", k: Optional[int] = None) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"AnchorMining: 'in_channels' must be >= 1, got {in_channels}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"AnchorMining: 'beta' must be in [0, 1], got {beta}")
        if anchors not in ("region", "topk"):
            raise ValueError(f"AnchorMining: 'anchors' must be 'region' or 'topk', got '{anchors}'")
        if k is not None and k < 1:
            raise ValueError(f"AnchorMining: 'k' must be >= 1, got {k}")
        self.in_channels = in_channels
        self.beta = beta
        self.anchors = anchors
        self.k = k
        self.phi = Sequential(Linear(in_channels, in_channels), ReLU(), Linear(in_channels, in_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.phi[0].reset_parameters()
        self.phi[2].reset_parameters()

    def forward(
        self,
        x: Tensor,
        region: Tensor,
        batch: Optional[Tensor] = None,
        num_regions: Optional[int] = None,
        num_bags: Optional[int] = None,
    ) -> AnchorOutput:
        if x.dim() != 2 or x.size(1) != self.in_channels:
            raise ValueError(f"AnchorMining: expected x [N, {self.in_channels}], got {tuple(x.shape)}")
        if batch is None:
            batch = torch.zeros_like(region)
            num_bags = 1
        num_regions = _num_regions(region, num_regions)
        num_bags = int(num_bags) if num_bags is not None else int(batch.max()) + 1
        r = self.phi(x)
        score = dual_level_scores(r, region, batch, self.beta, num_regions, num_bags)
        if self.anchors == "region":
            mask = segment_topk(score, region, 1, num_regions)
        else:
            if self.k is None:
                k = segment_count(_region_batch(region, batch, num_regions), num_bags)
            else:
                k = self.k
            mask = segment_topk(score, batch, k, num_bags)
        index = mask.nonzero().view(-1)
        return AnchorOutput(r, score, mask, index, batch[index])

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, beta={self.beta}, "
                f"anchors='{self.anchors}', k={self.k})")


class AnchorRegionCorrection(Module):
    r"""Anchor-guided region correction, ARC (AINet, Zheng et al.), over all regions of a batch.

    For region :math:`m` of bag :math:`b` with anchors :math:`A_b`, neighbour regions
    :math:`\mathcal{N}(m)` (:func:`region_neighbours`) and :math:`H` heads of width
    :math:`d = D/H`:

    .. math::
        \tilde R_m &= [\, r_{R_m} ;\ r_{A_b} \,], \qquad
        K_m = [\, r_{R_m} ;\ r_{R_{\mathcal{N}(m)}} ;\ r_{A_b} \,], \\
        \mathrm{head}_h &= \operatorname{softmax}\Big(\frac{(\tilde R_m W^Q_h)(K_m W^K_h)^\top}
            {\sqrt d}\Big) K_m W^V_h, \\
        \hat r_{R_m} &= \mathrm{LayerNorm}\big(r_{R_m} + [\mathrm{head}_1, \dots, \mathrm{head}_H] W^O\big)
            \ \text{(the region rows of the result)} .

    Attention rows are independent of each other, so the anchor *query* rows of
    :math:`\tilde R_m` do not affect the region rows that are kept; they are not computed (the
    test checks the equality against the full token set). An anchor that lies in region
    :math:`m` or its neighbour appears twice among the keys, as in the paper's concatenation.
    All regions are processed at once and none is padded to the largest: the key set of every
    region is listed as rows of :math:`K, V` (its own instances, its neighbours', its bag's
    anchors; :func:`~graphmil.nn.ragged.ranges_to_index`), and
    :func:`~graphmil.nn.ragged.ragged_attention` attends within each region (fused flash kernel on
    power-of-two size buckets; memory :math:`O(D \sum_m |K_m|)`, no :math:`L_{\max}^2` term, no
    mask over the largest region). Dropout (rate ``dropout``, training only) acts on the attention
    weights.

    Args:
        channels (int): ``D`` (divisible by ``heads``).
        heads (int): attention heads ``H`` (default ``8``).
        neighbour (str or None): ``'next'`` (next region in partition order, cyclic; default),
            ``'graph'`` (all regions sharing a spatial edge) or ``None`` (ACF: no neighbour).
        dropout (float): attention dropout while training (default ``0.0``).

    Shapes:
        - **input:** ``r [N, D]``, ``region [N]`` (global, ordered by bag), ``batch [N]``,
          ``anchor_index [A]``; ``edge_index [2, E]`` for ``'graph'``.
        - **output:** ``[N, D]``, aligned with the input.
    """

    def __init__(self, channels: int, heads: int = 8, neighbour: Optional[str] = "next", dropout: float = 0.0) -> None:
        super().__init__()
        if heads < 1 or channels % heads != 0:
            raise ValueError(f"AnchorRegionCorrection: 'channels' ({channels}) must be divisible by "
                             f"'heads' ({heads})")
        if neighbour not in _NEIGHBOURS:
            raise ValueError(f"AnchorRegionCorrection: 'neighbour' must be one of {_NEIGHBOURS}, got {neighbour!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"AnchorRegionCorrection: 'dropout' must be in [0, 1), got {dropout}")
        self.channels = channels
        self.heads = heads
        self.neighbour = neighbour
        self.dropout = dropout
        self.lin_q = Linear(channels, channels)
        self.lin_k = Linear(channels, channels)
        self.lin_v = Linear(channels, channels)
        self.lin_out = Linear(channels, channels)
        self.norm = LayerNorm(channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin_q, self.lin_k, self.lin_v, self.lin_out):
            lin.reset_parameters()
        self.norm.reset_parameters()

    def forward(
        self,
        r: Tensor,
        region: Tensor,
        batch: Optional[Tensor],
        anchor_index: Tensor,
        num_regions: Optional[int] = None,
        num_bags: Optional[int] = None,
        edge_index: Optional[Tensor] = None,
    ) -> Tensor:
        if r.dim() != 2 or r.size(1) != self.channels:
            raise ValueError(f"AnchorRegionCorrection: expected r [N, {self.channels}], got {tuple(r.shape)}")
        n, D = r.shape
        H, d = self.heads, self.channels // self.heads
        if batch is None:
            batch = torch.zeros_like(region)
            num_bags = 1
        R = _num_regions(region, num_regions)
        B = int(num_bags) if num_bags is not None else int(batch.max()) + 1
        region_batch = _region_batch(region, batch, R)
        nbr, nvalid = region_neighbours(region_batch, B, self.neighbour, region, edge_index)

        q, k, v = self.lin_q(r), self.lin_k(r), self.lin_v(r)
        perm = torch.argsort(region, stable=True)  # instances grouped by region
        size = segment_count(region, R)
        rptr = torch.cat([size.new_zeros(1), size.cumsum(0)])
        # anchors grouped by bag, after the instances in the source list of key rows
        a_batch = batch[anchor_index]
        a_idx = anchor_index[torch.argsort(a_batch, stable=True)]
        a_size = segment_count(a_batch, B)
        a_ptr = torch.cat([a_size.new_zeros(1), a_size.cumsum(0)])
        src = torch.cat([perm, a_idx])
        # key set of region m: [own rows ; rows of each valid neighbour ; anchors of its bag]
        start = torch.cat([rptr[:-1, None], rptr[nbr], (n + a_ptr[region_batch])[:, None]], 1)
        length = torch.cat([size[:, None], size[nbr] * nvalid, a_size[region_batch][:, None]], 1)
        pos, key_ptr = ranges_to_index(start, length)
        att = ragged_attention(
            q.index_select(0, perm).view(n, H, d), k.view(n, H, d), v.view(n, H, d), rptr, key_ptr,
            key_index=src[pos], dropout_p=self.dropout if self.training else 0.0,
        ).reshape(n, D)  # rows in ``perm`` order
        out = torch.empty_like(r).index_copy_(0, perm, self.lin_out(att))
        return self.norm(r + out)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.channels}, heads={self.heads}, "
                f"neighbour={self.neighbour!r}, dropout={self.dropout})")


class FrontEndOutput(NamedTuple):
    """What :class:`AINetFrontEnd` returns (unpacks as ``x, batch, region, keep_index, aux``).

    Attributes:
        x: corrected features of the kept instances ``[N', D]``.
        batch: their bag index ``[N']`` (sorted like the input).
        region: their global region id ``[N']`` (``0..R-1``, every region non-empty).
        keep_index: rows of the input that were kept ``[N']`` (ascending).
        aux: ``r`` (``φ(x)``, ``[N, D]``), ``score`` (DAM ``[N]``), ``anchor_index [A]``,
            ``corrected [N, D]``, ``logits`` (masking scores ``[N]``), ``keep`` (``[N]`` bool),
            ``region [N]`` (global), ``region_batch [R]``, ``consistency`` (``MSE(x, φ(x))``).
    """

    x: Tensor
    batch: Tensor
    region: Tensor
    keep_index: Tensor
    aux: Dict[str, Tensor]


class AINetFrontEnd(Module):
    r"""AINet's DAM + ARC + masking as a front end for any MIL pool (the paper's "+AINet").

    .. math::
        r = \phi(x), \quad A = \mathrm{DAM}(r), \quad \hat r = \mathrm{ARC}(r, A), \quad
        \text{keep} = \mathrm{mask}_\rho\big(w^\top(\tanh(V\hat r) \odot \sigma(U\hat r))\big),
        \quad \text{output } \hat r_{\text{keep}} .

    The masking score is a gated-attention scorer on the corrected features (``scorer``: by
    default a new :class:`~graphmil.nn.aggr.AttentionAggregation`; pass the downstream pool to share
    it — the scorer gets gradients only through a pool that uses it, since the selection is hard).
    Regions: give the global ``region`` ids (from :class:`~graphmil.transforms.RegionPartition`
    via :func:`~graphmil.transforms.global_region_index`); without them the bags are partitioned on
    the fly by the batched :func:`~graphmil.ops.kd_partition` of ``pos`` (no connectivity
    repair or reordering — precompute regions with the transform for that).

    Args:
        in_channels (int): ``D``.
        num_regions (int): regions per bag for on-the-fly partitions (default ``8``).
        beta (float): DAM region weight (default ``0.7``).
        heads (int): ARC heads (default ``8``).
        rho (float): fraction masked per region (default ``0.3``; ``0`` keeps all).
        neighbour (str or None): ARC neighbour mode, ``'next'`` (default), ``'graph'``, ``None``.
        anchors (str): ``'region'`` (default) or ``'topk'``.
        k (int, optional): anchors per bag for ``'topk'``.
        dropout (float): ARC attention dropout (default ``0.0``).
        hidden_channels (int): width of the default scorer (default ``128``).
        scorer (AttentionAggregation, optional): masking scorer to use (shared).
        min_region_size (int): smallest on-the-fly region (default ``1``).

    Shapes:
        - **input:** ``x [N, D]``, ``batch [N]`` (sorted), ``region [N]`` or ``pos [N, 2]``,
          ``edge_index [2, E]`` (``'graph'`` only).
        - **output:** :class:`FrontEndOutput`.
    """

    def __init__(
        self,
        in_channels: int,
        num_regions: int = 8,
        beta: float = 0.7,
        heads: int = 8,
        rho: float = 0.3,
        neighbour: Optional[str] = "next",
        anchors: str = "region",
        k: Optional[int] = None,
        dropout: float = 0.0,
        hidden_channels: int = 128,
        scorer: Optional[AttentionAggregation] = None,
        min_region_size: int = 1,
    ) -> None:
        super().__init__()
        if num_regions < 1:
            raise ValueError(f"AINetFrontEnd: 'num_regions' must be >= 1, got {num_regions}")
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"AINetFrontEnd: 'rho' must be in [0, 1), got {rho}")
        self.in_channels = in_channels
        self.num_regions = num_regions
        self.beta = beta
        self.heads = heads
        self.rho = rho
        self.neighbour = neighbour
        self.anchors = anchors
        self.k = k
        self.dropout = dropout
        self.hidden_channels = hidden_channels
        self.min_region_size = min_region_size
        self.dam = AnchorMining(in_channels, beta=beta, anchors=anchors, k=k)
        self.arc = AnchorRegionCorrection(in_channels, heads=heads, neighbour=neighbour, dropout=dropout)
        if scorer is None:
            scorer = AttentionAggregation(in_channels, hidden_channels, gated=True)
        elif getattr(scorer, "in_channels", in_channels) != in_channels:
            raise ValueError(f"AINetFrontEnd: 'scorer' takes {scorer.in_channels} features, expected {in_channels}")
        self.scorer = scorer
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.dam.reset_parameters()
        self.arc.reset_parameters()
        self.scorer.reset_parameters()

    def partition(self, pos: Tensor, batch: Tensor, num_bags: int) -> Tuple[Tensor, int]:
        """On-the-fly global region ids ``[N]`` and ``R`` from the batched k-d split of ``pos``."""
        from graphmil.ops.partition import kd_partition

        local, m = kd_partition(pos, batch, self.num_regions, num_bags, self.min_region_size)
        offset = torch.cat([m.new_zeros(1), m.cumsum(0)])
        return local + offset[batch], int(offset[-1])

    def forward(
        self,
        x: Tensor,
        batch: Optional[Tensor] = None,
        region: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        edge_index: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        num_regions: Optional[int] = None,
    ) -> FrontEndOutput:
        if x.dim() != 2 or x.size(1) != self.in_channels:
            raise ValueError(f"AINetFrontEnd: expected x [N, {self.in_channels}], got {tuple(x.shape)}")
        n = x.size(0)
        if batch is None:
            batch = torch.zeros(n, dtype=torch.long, device=x.device)
            dim_size = 1
        B = int(dim_size) if dim_size is not None else int(batch.max()) + 1
        if region is None:
            if pos is None:
                raise ValueError("AINetFrontEnd: give 'region' (global region ids) or 'pos' to partition")
            region, R = self.partition(pos, batch, B)
        else:
            if region.shape != (n,):
                raise ValueError(f"AINetFrontEnd: 'region' must be [N] with N = {n}, got {tuple(region.shape)}")
            R = _num_regions(region, num_regions)
            lo = scatter(batch, region, 0, R, reduce="min")
            if bool((lo != _region_batch(region, batch, R)).any()):
                raise ValueError("AINetFrontEnd: 'region' ids are shared by several bags; pass batch-unique "
                                 "ids (graphmil.transforms.global_region_index)")
        dam = self.dam(x, region, batch, R, B)
        corrected = self.arc(dam.r, region, batch, dam.anchor_index, R, B, edge_index)
        logits = self.scorer.score(corrected)[:, 0]
        if self.rho > 0:
            keep = region_mask(logits, region, self.rho, R)
        else:
            keep = torch.ones(n, dtype=torch.bool, device=x.device)
        keep_index = keep.nonzero().view(-1)
        aux = {
            "r": dam.r, "score": dam.score, "anchor_index": dam.anchor_index, "corrected": corrected,
            "logits": logits, "keep": keep, "region": region,
            "region_batch": _region_batch(region, batch, R),
            "consistency": F.mse_loss(dam.r, x),
        }
        return FrontEndOutput(corrected[keep_index], batch[keep_index], region[keep_index], keep_index, aux)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, num_regions={self.num_regions}, "
                f"beta={self.beta}, heads={self.heads}, rho={self.rho}, neighbour={self.neighbour!r}, "
                f"anchors='{self.anchors}', k={self.k}, dropout={self.dropout})")
