"""Bag-local multi-head self-attention over graph-batched bags, and the SmTAP encoder."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import LayerNorm, Linear, ModuleList

from graphmil.nn.conv.sm import SmConv
from graphmil.nn.ragged import ragged_attention
from graphmil.utils import index_to_ptr, resolve_index

__all__ = ["BagSelfAttention", "SmTransformerEncoder"]


class BagSelfAttention(torch.nn.Module):
    r"""Multi-head self-attention restricted to each bag of a graph batch (Vaswani et al., NeurIPS
    2017), as used by SmTAP (Castro-Macías et al., NeurIPS 2024).

    For the instances :math:`X_b` of bag :math:`b` and heads :math:`h = 1..H` of width
    :math:`d = C/H`:

    .. math::
        Q_h, K_h, V_h = X_b W^Q_h, X_b W^K_h, X_b W^V_h, \qquad
        \mathrm{MHSA}(X_b) = \big[\operatorname{softmax}\big(Q_h K_h^\top/\sqrt d\big) V_h\big]_{h=1..H}
        \,(W^O),

    with no attention across bags and dropout (rate ``dropout``, training only) on the attention
    weights. The output projection :math:`W^O` is optional (SmTAP has none). Bags are never padded
    to the largest one: :func:`~graphmil.nn.ragged.ragged_attention` runs PyTorch's fused flash
    kernel on power-of-two size buckets (fused varlen kernels on CUDA), so memory is
    :math:`O(N C)` in forward and backward and the work at most :math:`4 \sum_b n_b^2 C`
    (no :math:`B\,N_{\max}^2` term, no :math:`N_{\max} \times N_{\max}` mask). An unsorted
    ``index`` is stably sorted first and the order restored on output.

    Args:
        channels (int): width ``C`` (a multiple of ``heads``).
        heads (int): number of heads ``H`` (default ``8``).
        dropout (float): attention dropout (training only) (default ``0.0``).
        bias (bool): bias of the query/key/value projection (default ``True``).
        out_proj (bool): add the output projection :math:`W^O` (default ``True``).

    Shapes:
        - **input:** ``x [N, C]``, ``index [N]`` or ``ptr [B+1]`` (any order of ``index``).
        - **output:** ``[N, C]``.

    Example:
        >>> att = BagSelfAttention(16, heads=4)
        >>> att(torch.randn(5, 16), torch.tensor([0, 0, 1, 1, 1])).shape
        torch.Size([5, 16])
    """

    def __init__(
        self,
        channels: int,
        heads: int = 8,
        dropout: float = 0.0,
        bias: bool = True,
        out_proj: bool = True,
    ) -> None:
        super().__init__()
        if heads < 1 or channels % heads != 0:
            raise ValueError(f"BagSelfAttention: 'channels' ({channels}) must be a multiple of 'heads' ({heads})")
        self.channels = channels
        self.heads = heads
        self.dropout = dropout
        self.bias = bias
        self.out_proj = out_proj
        self.qkv = Linear(channels, 3 * channels, bias=bias)
        self.proj = Linear(channels, channels, bias=bias) if out_proj else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.qkv.reset_parameters()
        if self.proj is not None:
            self.proj.reset_parameters()

    def forward(
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
    ) -> Tensor:
        """Self-attention within each bag; returns ``[N, C]`` in the input order."""
        if x.dim() != 2 or x.size(-1) != self.channels:
            raise ValueError(f"BagSelfAttention: expected x of shape [N, {self.channels}], got {tuple(x.shape)}")
        index, dim_size = resolve_index(x.size(0), index, ptr, dim_size, device=x.device)
        n = x.size(0)
        if n == 0:
            return x.new_zeros(0, self.channels)
        perm = None
        if n > 1 and bool((index[1:] < index[:-1]).any()):
            perm = torch.sort(index, stable=True).indices
            x, index = x[perm], index[perm]
        ptr = index_to_ptr(index, dim_size)
        H = self.heads
        q, k, v = self.qkv(x).view(n, 3, H, self.channels // H).unbind(1)  # [N, H, d] each
        out = ragged_attention(q, k, v, ptr, dropout_p=self.dropout if self.training else 0.0)
        out = out.reshape(n, self.channels)  # sorted order
        if self.proj is not None:
            out = self.proj(out)
        if perm is not None:
            out = torch.empty_like(out).index_copy_(0, perm, out)
        return out

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.channels}, heads={self.heads}, dropout={self.dropout}, "
            f"bias={self.bias}, out_proj={self.out_proj})"
        )


class SmTransformerEncoder(torch.nn.Module):
    r"""The SmTAP encoder: pre-LayerNorm bag-local transformer whose attention output is smoothed
    by Sm (Castro-Macías et al., "Sm: enhanced localization in multiple instance learning for
    medical imaging classification", NeurIPS 2024, eq. 13).

    .. math::
        Z^{0} = X, \qquad Z^{l} = \mathrm{Sm}_l\big(\mathrm{MHSA}_l(\mathrm{LN}_l(Z^{l-1}))\big) + Z^{l-1},
        \quad l = 1..L, \qquad \text{out} = \mathrm{LN}(Z^{L}),

    with :class:`BagSelfAttention` (no output projection) and one
    :class:`~graphmil.nn.conv.SmConv` (own :math:`\alpha`) per layer; no feed-forward block.
    ``use_sm=False`` drops Sm (the "T" ablation of the paper).

    Args:
        channels (int): width ``C`` (default ``512``).
        heads (int): attention heads (default ``8``).
        num_layers (int): layers ``L`` (default ``2``).
        dropout (float): attention dropout (default ``0.0``).
        use_sm (bool): smooth the attention output with Sm (default ``True``).
        alpha (float): Sm propagation weight (initial if learnable) (default ``0.5``).
        K (int): Sm iterations (default ``10``).
        learn_alpha (bool): learn Sm's :math:`\alpha` (default ``True``).
        mode (str): Sm mode (default ``'approx'``).
        normalize (bool): Sm normalises the edge weights (default ``True``).
        self_loops_for_isolated (bool): Sm self-loops on degree-0 instances (default ``False``).

    Shapes:
        - **input:** ``x [N, C]``, ``edge_index [2, E]``, ``index [N]`` or ``ptr [B+1]``,
          optional ``edge_weight [E]``.
        - **output:** ``[N, C]``.
    """

    def __init__(
        self,
        channels: int = 512,
        heads: int = 8,
        num_layers: int = 2,
        dropout: float = 0.0,
        use_sm: bool = True,
        alpha: float = 0.5,
        K: int = 10,
        learn_alpha: bool = True,
        mode: str = "approx",
        normalize: bool = True,
        self_loops_for_isolated: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"SmTransformerEncoder: 'num_layers' must be >= 1, got {num_layers}")
        self.channels = channels
        self.heads = heads
        self.num_layers = num_layers
        self.dropout = dropout
        self.use_sm = use_sm
        self.alpha = alpha
        self.K = K
        self.learn_alpha = learn_alpha
        self.mode = mode
        self.normalize = normalize
        self.self_loops_for_isolated = self_loops_for_isolated
        self.norms = ModuleList([LayerNorm(channels) for _ in range(num_layers)])
        self.attns = ModuleList(
            [BagSelfAttention(channels, heads, dropout=dropout, out_proj=False) for _ in range(num_layers)]
        )
        self.sms = ModuleList(
            [SmConv(alpha=alpha, K=K, learn_alpha=learn_alpha, mode=mode, normalize=normalize,
                    self_loops_for_isolated=self_loops_for_isolated) for _ in range(num_layers)]
            if use_sm else []
        )
        self.final_norm = LayerNorm(channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in [*self.norms, *self.attns, *self.sms, self.final_norm]:
            m.reset_parameters()

    def forward(
        self,
        x: Tensor,
        edge_index: Optional[Tensor] = None,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        edge_weight: Optional[Tensor] = None,
    ) -> Tensor:
        """Encode the instances of each bag; returns ``[N, C]``."""
        if self.use_sm and edge_index is None:
            raise ValueError("SmTransformerEncoder: 'edge_index' is required when use_sm=True")
        index, dim_size = resolve_index(x.size(0), index, ptr, dim_size, device=x.device)
        z = x
        for layer in range(self.num_layers):
            h = self.attns[layer](self.norms[layer](z), index, dim_size=dim_size)
            if self.use_sm:
                h = self.sms[layer](h, edge_index, edge_weight, index)
            z = h + z
        return self.final_norm(z)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.channels}, heads={self.heads}, num_layers={self.num_layers}, "
            f"dropout={self.dropout}, use_sm={self.use_sm}, alpha={self.alpha}, K={self.K}, "
            f"learn_alpha={self.learn_alpha}, mode={self.mode!r})"
        )
