"""The Sm smooth operator (Castro-Macías et al., NeurIPS 2024) as a sparse PyG message-passing layer."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.typing import Adj, OptTensor
from torch_geometric.utils import scatter

__all__ = ["SmConv", "sm_normalized_adjacency", "sparse_cg_solve"]

_MODES = ("approx", "exact")


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _csr_spmm(adj_t: Tensor, x: Tensor) -> Tensor:
    """``adj_t @ x`` for a ``torch.sparse_csr`` matrix on CPU and CUDA."""
    if x.dim() == 1:
        return _csr_spmm(adj_t, x.unsqueeze(-1)).squeeze(-1)
    if not x.is_cuda and not _is_compiling():
        # The CPU ``spmm_reduce`` kernel is the fastest sum-SpMM on CPU (it is what PyG's ``spmm``
        # dispatches to); it supports autograd w.r.t. ``x`` and the matrix values.
        return torch.sparse.mm(adj_t, x, "sum")
    return adj_t @ x


def sm_normalized_adjacency(
    edge_index: Tensor,
    num_nodes: int,
    edge_weight: OptTensor = None,
    normalize: bool = True,
    self_loops_for_isolated: bool = False,
    dtype: Optional[torch.dtype] = None,
    loop_candidates: OptTensor = None,
) -> Tensor:
    r"""The propagation matrix :math:`\hat A` of :class:`SmConv` as a ``torch.sparse_csr`` tensor.

    With ``normalize=True``, :math:`\hat A = D^{-1/2} A D^{-1/2}` with :math:`D = \mathrm{diag}(A\mathbf 1)`
    (degree-0 rows stay empty); no self-loops are added except, with ``self_loops_for_isolated``, a
    unit self-loop on every instance of degree 0 (which then gets :math:`\hat A_{ii} = 1`).
    The returned matrix is ``adj_t`` in PyG's convention: row ``i`` holds the weights of the
    messages *into* node ``i`` (``edge_index[1] == i``), so ``adj_t @ x`` aggregates at targets.

    Args:
        edge_index (LongTensor): ``[2, E]`` edges (source, target).
        num_nodes (int): ``N``.
        edge_weight (Tensor, optional): ``[E]`` non-negative weights (default: all ones).
        normalize (bool): apply the symmetric normalisation (default ``True``); ``False`` uses
            ``edge_weight`` as given (already normalised).
        self_loops_for_isolated (bool): add a unit self-loop to degree-0 nodes (default ``False``).
        dtype (torch.dtype, optional): value dtype (default: that of ``edge_weight`` or float32).
        loop_candidates (BoolTensor, optional): ``[N]``; these nodes get a unit self-loop if their
            degree is 0 (:class:`SmConv` passes the instances of one-instance bags).

    Shapes:
        - **output:** sparse CSR ``[N, N]``.
    """
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"SmConv: 'edge_index' must have shape [2, E], got {tuple(edge_index.shape)}")
    device = edge_index.device
    if dtype is None:
        dtype = edge_weight.dtype if edge_weight is not None else torch.get_default_dtype()
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.size(1), dtype=dtype, device=device)
    elif edge_weight.dim() != 1 or edge_weight.numel() != edge_index.size(1):
        raise ValueError(
            f"SmConv: 'edge_weight' must have shape [E] = [{edge_index.size(1)}], got {tuple(edge_weight.shape)}"
        )
    edge_weight = edge_weight.to(dtype)
    row, col = edge_index[0], edge_index[1]  # messages flow row (source) -> col (target)
    add_loops = self_loops_for_isolated or loop_candidates is not None
    if add_loops or normalize:
        deg = scatter(edge_weight, col, 0, num_nodes, reduce="sum")
    if add_loops:
        iso = deg == 0
        if not self_loops_for_isolated:
            iso = iso & loop_candidates
        iso = torch.nonzero(iso).view(-1)
        row = torch.cat([row, iso])
        col = torch.cat([col, iso])
        edge_weight = torch.cat([edge_weight, edge_weight.new_ones(iso.numel())])
        deg = deg.index_fill(0, iso, 1.0)
    if normalize:
        dinv = deg.pow(-0.5)
        dinv = dinv.masked_fill(torch.isinf(dinv), 0.0)
        edge_weight = dinv[row] * edge_weight * dinv[col]
    # CSR of adj_t: rows = targets, columns = sources, sorted by (target, source).
    perm = torch.argsort(col * num_nodes + row)
    counts = torch.bincount(col, minlength=num_nodes)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(
            crow, row[perm], edge_weight[perm], (num_nodes, num_nodes), check_invariants=False
        )


def sparse_cg_solve(
    matvec,
    b: Tensor,
    tol: float = 1e-6,
    max_iter: int = 1000,
    x0: OptTensor = None,
) -> Tuple[Tensor, int]:
    r"""Conjugate gradient for an SPD system :math:`S X = B`, one independent CG per column of ``B``.

    Stops when every column satisfies :math:`\|b - S x\|_2 \le \mathrm{tol}\,\|b\|_2` or after
    ``max_iter`` iterations. Runs without autograd (used inside :class:`SmConv`'s exact mode, whose
    backward is another solve).

    Args:
        matvec (callable): ``X [N, D] -> S X [N, D]``.
        b (Tensor): right-hand side ``[N, D]``.
        tol (float): relative residual tolerance (default ``1e-6``).
        max_iter (int): iteration cap (default ``1000``).
        x0 (Tensor, optional): initial guess (default: ``b``).

    Returns:
        ``(x, iterations)``.
    """
    with torch.no_grad():
        x = b.clone() if x0 is None else x0.clone()
        r = b - matvec(x)
        p = r.clone()
        rs = (r * r).sum(0)  # [D]
        bnorm2 = (b * b).sum(0)
        thresh = (tol * tol) * bnorm2
        it = 0
        while it < max_iter:
            if bool((rs <= thresh).all()):
                break
            Sp = matvec(p)
            pSp = (p * Sp).sum(0)
            step = torch.where(pSp > 0, rs / pSp.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rs))
            x.addcmul_(p, step)
            r.addcmul_(Sp, step, value=-1.0)
            rs_new = (r * r).sum(0)
            beta = torch.where(rs > 0, rs_new / rs.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rs))
            p = r + p * beta
            rs = rs_new
            it += 1
    return x, it


def _sm_recursion(mat: Tensor, u: Tensor, a: float, K: int) -> Tensor:
    r""":math:`K` steps of :math:`G_t = a\,M G_{t-1} + (1-a) U` with one fused ``addmm`` per step
    into two reused buffers (CPU; no per-step allocation)."""
    u = u.contiguous()
    h = u * (1.0 - a)
    bufs = (torch.empty_like(u), torch.empty_like(u))
    g = u
    for t in range(K):
        out = bufs[t % 2]
        torch.addmm(h, mat, g, beta=1.0, alpha=a, out=out)
        g = out
    return g


class _ApproxSm(torch.autograd.Function):
    r"""The approx recursion as one autograd node (CPU training path), in :math:`O(N F)` memory.

    :math:`G_K = P(\hat A) U` with :math:`P(z) = (1-\alpha)\sum_{t<K} \alpha^t z^t + \alpha^K z^K`,
    so :math:`\partial L/\partial U = P(\hat A^\top)\, \bar G` is the same recursion run on the
    transpose with the incoming gradient :math:`\bar G` as input. For :math:`\alpha` the forward is
    recomputed together with its tangent :math:`D_t = \partial G_t/\partial\alpha =
    \hat A G_{t-1} + \alpha \hat A D_{t-1} - U` (:math:`D_0 = 0`), one SpMM of width :math:`2F` per
    step, and :math:`\partial L/\partial\alpha = \langle \bar G, D_K\rangle`. Nothing of size
    :math:`K N F` is stored, which removes the page-fault storm of :math:`K` fresh ``[N, F]``
    temporaries per call on large batches.
    """

    @staticmethod
    def forward(ctx, u: Tensor, alpha: Tensor, adj_t: Tensor, adj: Tensor, K: int):  # type: ignore[override]
        a = float(alpha)
        ctx.save_for_backward(u, alpha)
        ctx.adj_t, ctx.adj, ctx.K = adj_t, adj, K
        return _sm_recursion(adj_t, u, a, K)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, alpha = ctx.saved_tensors
        a, K = float(alpha), ctx.K
        grad = grad.contiguous()
        grad_u = _sm_recursion(ctx.adj, grad, a, K) if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1] and a == 0.0:
            grad_alpha = None  # unreachable: alpha_value keeps alpha >= finfo(dtype).eps
        if ctx.needs_input_grad[1] and a > 0.0:
            f = u.size(1)
            gd = torch.cat([u, torch.zeros_like(u)], dim=1)  # [G_t | D_t]
            nxt = torch.empty_like(gd)
            shift = torch.cat([u * (1.0 - a), -u], dim=1)  # (1-a) U for G, -U for D
            for _ in range(K):
                # [G' | D'] = a A [G | D] + [(1-a) U | -U], fused into the reused buffer; then
                # D' += A G, where A G = (G' - (1-a) U) / a (a >= finfo(dtype).eps > 0 here).
                torch.addmm(shift, ctx.adj_t, gd, beta=1.0, alpha=a, out=nxt)
                nxt[:, f:].add_(nxt[:, :f], alpha=1.0 / a).sub_(u, alpha=(1.0 - a) / a)
                gd, nxt = nxt, gd
            grad_alpha = (grad * gd[:, f:]).sum().reshape(alpha.shape).to(alpha.dtype)
        return grad_u, grad_alpha, None, None, None


class _CsrSpMM(torch.autograd.Function):
    """``adj_t @ x`` on CPU with the ``spmm_reduce`` kernel both ways: the backward multiplies by
    the precomputed transpose ``adj`` (CSR) instead of transposing ``adj_t`` at every step."""

    @staticmethod
    def forward(ctx, adj_t: Tensor, adj: Tensor, x: Tensor):  # type: ignore[override]
        ctx.adj = adj
        return torch.sparse.mm(adj_t, x, "sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return None, None, torch.sparse.mm(ctx.adj, grad.contiguous(), "sum")


class _ExactSm(torch.autograd.Function):
    r"""Solve :math:`(I - \alpha \hat A) G = (1-\alpha) U` by CG; backward is another CG solve.

    With :math:`S = I - \alpha\hat A` (symmetric) and upstream gradient :math:`\bar G`:
    :math:`\lambda = S^{-1}\bar G`, :math:`\bar U = (1-\alpha)\lambda`,
    :math:`\bar\alpha = \langle \lambda, \hat A G - U\rangle`.
    """

    @staticmethod
    def forward(ctx, u: Tensor, alpha: Tensor, adj_t: Tensor, tol: float, max_iter: int):  # type: ignore[override]
        a = alpha.detach()

        def matvec(v: Tensor) -> Tensor:
            return v - a * _csr_spmm(adj_t, v)

        g, _ = sparse_cg_solve(matvec, (1 - a) * u.detach(), tol=tol, max_iter=max_iter, x0=u.detach())
        ctx.save_for_backward(u, alpha, g)
        ctx.adj_t = adj_t
        ctx.tol, ctx.max_iter = tol, max_iter
        return g

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_g: Tensor):  # type: ignore[override]
        u, alpha, g = ctx.saved_tensors
        adj_t = ctx.adj_t
        a = alpha.detach()

        def matvec(v: Tensor) -> Tensor:
            return v - a * _csr_spmm(adj_t, v)

        lam, _ = sparse_cg_solve(matvec, grad_g, tol=ctx.tol, max_iter=ctx.max_iter)
        grad_u = (1 - a) * lam if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = (lam * (_csr_spmm(adj_t, g) - u)).sum().reshape(alpha.shape).to(alpha.dtype)
        return grad_u, grad_alpha, None, None, None


class SmConv(MessagePassing):
    r"""The Sm smooth operator of SmAP/SmTAP (Castro-Macías et al., "Sm: enhanced localization in
    multiple instance learning for medical imaging classification", NeurIPS 2024), as a sparse
    message-passing layer.

    With the symmetric adjacency :math:`A` of the bag graph(s), :math:`D = \mathrm{diag}(A\mathbf 1)`,
    :math:`\hat A = D^{-1/2} A D^{-1/2}` (no self-loops) and :math:`\tilde L = I - \hat A`:

    .. math::
        \mathrm{Sm}(U) = \arg\min_G\ \alpha\,\mathrm{Tr}(G^\top \tilde L G) + (1-\alpha)\|G - U\|_F^2
                      = (I + \gamma \tilde L)^{-1} U, \qquad \gamma = \frac{\alpha}{1-\alpha}.

    ``mode='approx'`` runs :math:`K` steps of the fixed-point recursion

    .. math::
        G_0 = U, \qquad G_t = \alpha \hat A G_{t-1} + (1-\alpha) U, \quad t = 1..K,

    (identical to PyG ``APPNP(K, alpha=1-α, add_self_loops=False, normalize=False)`` on
    :math:`\hat A`), which converges to the closed form; ``mode='exact'`` solves the SPD system
    :math:`(I - \alpha\hat A) G = (1-\alpha) U` by conjugate gradient on the sparse matrix, with a
    backward that is another CG solve (gradients w.r.t. :math:`U` and :math:`\alpha`).

    :math:`\alpha` is the *propagation weight* in both modes (the graphmil convention, that of the
    paper's equations). With ``learn_alpha=True``,

    .. math::
        \alpha = \mathrm{clip}\big(\sigma(\theta),\ \epsilon,\ 1 - \epsilon\big), \qquad
        \frac{\partial \alpha}{\partial \theta} = \sigma(\theta)\,\big(1 - \sigma(\theta)\big)
        \quad \text{(straight-through at the bounds)},

    with :math:`\theta` a parameter initialised at :math:`\mathrm{logit}(\alpha)` (so the clip is
    inactive and :math:`\alpha` is exactly the requested value) and :math:`\epsilon` the machine
    epsilon of the dtype the layer runs in (:math:`2^{-23}` in float32): :math:`\sigma(\theta)`
    rounds to exactly ``1`` in float32 for :math:`\theta \gtrsim 16.6`, and :math:`\alpha` and
    :math:`1-\alpha` must stay non-zero (the recursion's :math:`(1-\alpha) U`, the exact system's
    conditioning, the :math:`\alpha` tangent's division by :math:`\alpha`). A fixed ``alpha`` is
    clipped the same way. One :math:`\alpha` per layer.

    :math:`\hat A` is computed from ``edge_index``/``edge_weight`` on every call (never cached: a
    batch holds different bags), stored as one ``torch.sparse_csr`` matrix per forward and reused
    over the :math:`K` iterations (fused SpMM in :meth:`message_and_aggregate`, no per-edge
    gather/scatter). The batch adjacency is block-diagonal, so bags never mix.

    Degree-0 instances have an empty row of :math:`\hat A` (:math:`\tilde L_{ii} = 1`), so both
    modes give :math:`G_i = (1-\alpha) U_i`; ``self_loops_for_isolated=True`` adds a unit
    self-loop to them (:math:`\hat A_{ii} = 1`), which leaves them unchanged, :math:`G_i = U_i`.
    A one-instance bag (``N == 1`` without ``batch``, or a bag of one instance in ``batch``) gets a
    unit self-loop when it has no edge, so it is returned unchanged rather than scaled by
    :math:`1-\alpha` (graphmil's ``GridGraph`` gives such a bag no edges).

    Exact mode requires a symmetric :math:`A` (an SPD system); the gradient w.r.t. edge weights is
    available in approx mode only.

    Args:
        alpha (float): propagation weight :math:`\alpha \in (0, 1)` (initial value if learnable;
            clipped to :math:`[\epsilon, 1-\epsilon]`) (default ``0.5``).
        K (int): iterations of the approx recursion (default ``10``).
        learn_alpha (bool): learn :math:`\alpha = \mathrm{clip}(\sigma(\theta), \epsilon, 1-\epsilon)`
            (default ``True``).
        mode (str): ``'approx'`` or ``'exact'`` (default ``'approx'``).
        normalize (bool): compute :math:`\hat A` from the edge weights (default ``True``);
            ``False`` uses ``edge_weight`` as the already-normalised :math:`\hat A`.
        self_loops_for_isolated (bool): unit self-loops on degree-0 instances (default ``False``).
        cg_tol (float): relative residual tolerance of CG in exact mode (default ``1e-6``).
        cg_max_iter (int): CG iteration cap in exact mode (default ``1000``).

    Shapes:
        - **input:** ``x [N, F]`` (or ``[N]``), ``edge_index [2, E]``, optional ``edge_weight [E]``,
          optional ``batch [N]``.
        - **output:** same shape as ``x``.

    Example:
        >>> conv = SmConv(alpha=0.5, K=10)
        >>> x = torch.randn(4, 8)
        >>> edge_index = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])
        >>> conv(x, edge_index).shape
        torch.Size([4, 8])
    """

    def __init__(
        self,
        alpha: float = 0.5,
        K: int = 10,
        learn_alpha: bool = True,
        mode: str = "approx",
        normalize: bool = True,
        self_loops_for_isolated: bool = False,
        cg_tol: float = 1e-6,
        cg_max_iter: int = 1000,
        **kwargs,
    ) -> None:
        kwargs.setdefault("aggr", "add")
        super().__init__(**kwargs)
        if not isinstance(alpha, (float, int)) or not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"SmConv: 'alpha' must be a float in (0, 1), got {alpha!r}")
        if int(K) < 0:
            raise ValueError(f"SmConv: 'K' must be >= 0, got {K}")
        if mode not in _MODES:
            raise ValueError(f"SmConv: 'mode' must be one of {_MODES}, got {mode!r}")
        if cg_tol <= 0 or int(cg_max_iter) < 1:
            raise ValueError(f"SmConv: 'cg_tol' must be > 0 and 'cg_max_iter' >= 1, got {cg_tol}, {cg_max_iter}")
        self.alpha = float(alpha)
        self.K = int(K)
        self.learn_alpha = bool(learn_alpha)
        self.mode = mode
        self.normalize = bool(normalize)
        self.self_loops_for_isolated = bool(self_loops_for_isolated)
        self.cg_tol = float(cg_tol)
        self.cg_max_iter = int(cg_max_iter)
        if self.learn_alpha:
            self.theta = torch.nn.Parameter(torch.empty(()))
        else:
            self.register_parameter("theta", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.theta is not None:
            with torch.no_grad():
                self.theta.fill_(math.log(self.alpha / (1.0 - self.alpha)))

    def alpha_value(self, dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
        r"""The current :math:`\alpha` as a 0-d tensor of ``dtype`` (differentiable when learnable),
        strictly inside :math:`(0, 1)`: :math:`\alpha = \mathrm{clip}(\sigma(\theta), \epsilon, 1 - \epsilon)`
        with :math:`\epsilon` the machine epsilon of ``dtype`` and a straight-through gradient.

        Args:
            dtype (torch.dtype, optional): the dtype the operator runs in (default: that of
                :math:`\theta`, or the default dtype for a fixed :math:`\alpha`).
            device (torch.device, optional): the device of the result (default: that of
                :math:`\theta`, or the CPU).
        """
        dtype = dtype or (self.theta.dtype if self.theta is not None else torch.get_default_dtype())
        # Why a bound: sigma(theta) rounds to exactly 1 in float32 for theta >~ 16.6 (and to 0 below
        # about -103), and alpha = 1 or 0 breaks the operator: the (1 - alpha) U term vanishes, the
        # exact system (I - alpha A) G = (1 - alpha) U becomes singular, and the alpha tangent of
        # the approx backward divides by alpha. eps = finfo(dtype).eps (2^-23 in float32) makes both
        # alpha and 1 - alpha exact, normal, non-zero numbers of the dtype the operator runs in
        # (1 - eps and eps are representable in every float format, also float16/bfloat16, where a
        # bound fixed for float32 would round back to 1). We clamp, rather than rescale as
        # eps + (1 - 2 eps) sigma, so that alpha is sigma(theta) *exactly* inside [eps, 1 - eps]: the
        # initialisation theta = logit(alpha) gives the requested alpha in every dtype. The gradient
        # is straight-through (d alpha / d theta = sigma'(theta), not 0 at the bound), so theta can
        # come back from a bound while sigma has not saturated.
        eps = torch.finfo(dtype).eps
        if self.theta is not None:
            work = torch.promote_types(self.theta.dtype, dtype)  # sigmoid in the wider of the two
            a = torch.sigmoid(self.theta.to(work)).to(dtype=dtype, device=device)
            return a.detach().clamp(eps, 1.0 - eps) + (a - a.detach())  # value: exactly the clamp
        return torch.tensor(self.alpha, dtype=dtype, device=device).clamp(eps, 1.0 - eps)

    def forward(
        self,
        x: Tensor,
        edge_index: Adj,
        edge_weight: OptTensor = None,
        batch: OptTensor = None,
    ) -> Tensor:
        """Smooth ``x`` over the graph(s) given by ``edge_index`` (and ``edge_weight``).

        ``batch`` (the bag index ``[N]``, optional) only serves to find one-instance bags, which
        get a self-loop; without it the input is one bag.
        """
        squeeze = x.dim() == 1
        if squeeze:
            x = x.unsqueeze(-1)
        if x.dim() != 2:
            raise ValueError(f"SmConv: 'x' must be [N] or [N, F], got shape {tuple(x.shape)}")
        if not isinstance(edge_index, Tensor) or edge_index.is_sparse or edge_index.layout != torch.strided:
            raise ValueError("SmConv: 'edge_index' must be a dense LongTensor [2, E]")
        n = x.size(0)
        if edge_index.numel() > 0 and int(edge_index.max()) >= n:
            raise ValueError(f"SmConv: 'edge_index' refers to node {int(edge_index.max())} but x has {n} rows")
        if batch is None:
            single = torch.full((n,), n == 1, dtype=torch.bool, device=x.device)
        else:
            if batch.dim() != 1 or batch.numel() != n:
                raise ValueError(f"SmConv: 'batch' must be [N] = [{n}], got shape {tuple(batch.shape)}")
            counts = torch.bincount(batch)
            single = counts[batch] == 1
        adj_t = sm_normalized_adjacency(
            edge_index, n, edge_weight, normalize=self.normalize,
            self_loops_for_isolated=self.self_loops_for_isolated, dtype=x.dtype, loop_candidates=single,
        )
        alpha = self.alpha_value(dtype=x.dtype, device=x.device)
        if self.mode == "exact":
            out = _ExactSm.apply(x, alpha, adj_t, self.cg_tol, self.cg_max_iter)
        else:
            out = self.propagate_approx(x, adj_t, alpha)
        return out.squeeze(-1) if squeeze else out

    def propagate_approx(self, x: Tensor, adj_t: Tensor, alpha: Tensor) -> Tensor:
        r""":math:`K` steps of :math:`G_t = \alpha \hat A G_{t-1} + (1-\alpha) U` on a prebuilt ``adj_t``."""
        # ``message_and_aggregate`` is called directly: ``MessagePassing.propagate`` converts a
        # ``torch.sparse`` matrix back to an edge list on every call (an O(E) pass per iteration,
        # as costly as the SpMM itself for 1-wide inputs) and adds no behaviour here.
        # On CPU, when x or alpha (not the edge weights) needs a gradient, the transpose is built once
        # and each backward step is another fast SpMM (see ``_CsrSpMM``).
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or alpha.requires_grad or adj_t.values().requires_grad
        )
        if not needs_grad and not x.is_cuda and self.K > 0 and not _is_compiling():
            # Inference on CPU: one fused ``addmm`` per step into two reused buffers (no fresh
            # allocation, no separate scaling/addition pass): ~4x faster than the autograd path.
            return _sm_recursion(adj_t, x, float(alpha), self.K)
        adj = None
        if (
            self.K > 0 and (x.requires_grad or alpha.requires_grad) and torch.is_grad_enabled() and not x.is_cuda
            and not adj_t.values().requires_grad and not _is_compiling()
        ):
            adj = adj_t.t().to_sparse_csr()
            if x.dim() == 2:
                # Training on CPU: the whole recursion is one autograd node in O(N F) memory.
                return _ApproxSm.apply(x, alpha, adj_t, adj, self.K)
        h = (1 - alpha) * x
        g = x
        for _ in range(self.K):
            prop = _CsrSpMM.apply(adj_t, adj, g) if adj is not None else self.message_and_aggregate(adj_t, g)
            g = torch.addcmul(h, alpha, prop)
        return g

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:  # pragma: no cover - fused path
        return edge_weight.view(-1, 1) * x_j

    def message_and_aggregate(self, adj_t: Adj, x: Tensor) -> Tensor:
        return _csr_spmm(adj_t, x)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(alpha={self.alpha}, K={self.K}, learn_alpha={self.learn_alpha}, "
            f"mode={self.mode!r}, normalize={self.normalize}, "
            f"self_loops_for_isolated={self.self_loops_for_isolated}, cg_tol={self.cg_tol}, "
            f"cg_max_iter={self.cg_max_iter})"
        )
