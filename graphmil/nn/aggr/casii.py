"""CASii saliency-informed cross-attention pooling (Su et al., 2024) as a PyG aggregation."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Linear, Parameter
from torch_geometric.utils import scatter

from graphmil.nn.aggr.base import AttentionPool, PoolOutput
from graphmil.utils import segment_softmax

__all__ = ["CASiiAggregation"]

_NORM_EPS = 1e-12  # q̂ = q̃ / max(||q̃||, eps), as torch.nn.functional.normalize


class CASiiAggregation(AttentionPool):
    r"""CASii cross-attention pooling against a bank of negative keys (Su et al., 2024).

    Each instance is compared with the ``τ`` negative keys :math:`k_j` (rows of ``keys``, see
    :func:`graphmil.nn.casii.select_negative_keys`); its saliency is a learned linear read-out of
    those cosine similarities:

    .. math::
        \tilde k_j = \tanh(W_k k_j + b_k),\quad \tilde q_i = \tanh(W_q x_i + b_q),\quad
        \tilde v_i = \operatorname{ReLU}(W_v x_i + b_v) \qquad (\in \mathbb{R}^{D_h}) \\
        C_{ij} = \cos(\tilde q_i, \tilde k_j),\qquad s_i = w_s^\top C_{i,:} + b_s
        \qquad (w_s \in \mathbb{R}^{\tau}) \\
        a_i = \operatorname{softmax}_{j \in b(i)}(s_j / T)_i, \qquad z_b = \sum_{i \in b} a_i \tilde v_i .

    graphmil never forms the ``N × τ`` matrix :math:`C`: with :math:`\hat q = \tilde q /
    \max(\lVert\tilde q\rVert, \epsilon)` and :math:`\hat k` likewise (:math:`\epsilon = 10^{-12}`),

    .. math::
        s_i = \hat q_i^\top u + b_s, \qquad u = \sum_{j=1}^{\tau} w_{s,j}\, \hat k_j \in \mathbb{R}^{D_h},

    which costs :math:`O((N + \tau) D_h)` time and memory instead of :math:`O(N \tau D_h)` and
    :math:`O(N\tau)`. :meth:`attend_explicit` keeps the explicit-:math:`C` form (for tests and the
    benchmark only). The saliency logits :math:`s` are the instance scores (and the input of
    :class:`graphmil.losses.CASiiInstanceLoss`).

    **Keys** are a buffer (saved in the state dict, moved by ``.to()``, never trained). ``w_s`` has
    one weight per key, so its size follows the bank: :meth:`set_keys` replaces the bank and
    re-initialises ``w_s`` (call it before building the optimizer), and ``load_state_dict`` resizes
    both to the saved bank, so a model saved with ``τ`` keys loads into one built with any other
    ``τ`` (or none).

    Args:
        in_channels (int): feature width ``D`` of instances and keys.
        keys (Tensor, optional): key bank ``[τ, D]`` (default ``None``: set it later with
            :meth:`set_keys` or ``load_state_dict``; pooling without keys raises).
        hidden_channels (int): projection width ``D_h`` (default ``512``).
        temperature (float): softmax temperature ``T`` (default ``1.0``).

    Shapes:
        - **input:** ``x [N, D]``, ``index [N]`` or ``ptr [B+1]``.
        - **output:** ``forward`` → ``[B, D_h]``; :meth:`attend` → :class:`PoolOutput` with
          ``attention [N]`` and ``logits`` = saliency ``s [N]``.

    Example:
        >>> pool = CASiiAggregation(16, keys=torch.randn(10, 16), hidden_channels=8)
        >>> out = pool.attend(torch.randn(7, 16), torch.tensor([0, 0, 0, 1, 1, 1, 1]))
        >>> out.pooled.shape, out.logits.shape
        (torch.Size([2, 8]), torch.Size([7]))
    """

    keys: Tensor

    def __init__(
        self,
        in_channels: int,
        keys: Optional[Tensor] = None,
        hidden_channels: int = 512,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if in_channels < 1 or hidden_channels < 1:
            raise ValueError(f"CASiiAggregation: 'in_channels' and 'hidden_channels' must be >= 1, got "
                             f"{in_channels} and {hidden_channels}")
        if not temperature > 0:
            raise ValueError(f"CASiiAggregation: 'temperature' must be > 0, got {temperature}")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.temperature = float(temperature)
        self.key_lin = Linear(in_channels, hidden_channels)
        self.query_lin = Linear(in_channels, hidden_channels)
        self.value_lin = Linear(in_channels, hidden_channels)
        self.register_buffer("keys", torch.zeros(0, in_channels))
        self.saliency_weight = Parameter(torch.empty(0))
        self.saliency_bias = Parameter(torch.empty(1))
        if keys is not None:
            self.set_keys(keys)
        self.reset_parameters()

    # ------------------------------------------------------------------ keys
    @property
    def num_keys(self) -> int:
        """``τ``, the number of keys in the bank (0 before keys are set)."""
        return self.keys.size(0)

    def _check_keys(self, keys: Tensor, name: str = "keys") -> Tensor:
        if not isinstance(keys, Tensor):
            raise ValueError(f"CASiiAggregation: '{name}' must be a tensor [τ, {self.in_channels}], "
                             f"got {type(keys).__name__}")
        if keys.dim() != 2 or keys.size(1) != self.in_channels:
            raise ValueError(f"CASiiAggregation: '{name}' must be [τ, {self.in_channels}], got "
                             f"{tuple(keys.shape)}")
        if keys.is_floating_point() and not torch.isfinite(keys).all():
            raise ValueError(f"CASiiAggregation: '{name}' contains NaN/Inf")
        return keys

    def _resize(self, num_keys: int) -> None:
        dev, dt = self.keys.device, self.keys.dtype
        self.keys = torch.zeros(num_keys, self.in_channels, device=dev, dtype=dt)
        if self.saliency_weight.numel() != num_keys:
            self.saliency_weight = Parameter(torch.empty(num_keys, device=self.saliency_weight.device,
                                                         dtype=self.saliency_weight.dtype))
            self.reset_saliency()

    def set_keys(self, keys: Tensor) -> None:
        """Replace the key bank by ``keys [τ, D]`` and re-initialise ``w_s`` (and ``b_s``).

        ``w_s`` keeps its ``Parameter`` object when ``τ`` is unchanged, otherwise a new one is
        created: build (or rebuild) the optimizer after calling this.
        """
        keys = self._check_keys(keys).detach()
        self._resize(keys.size(0))
        self.keys.copy_(keys.to(self.keys.dtype))
        self.reset_saliency()

    def reset_saliency(self) -> None:
        """Re-initialise the read-out ``w_s``, ``b_s`` like ``Linear(τ, 1)``: ``U(±1/√τ)``."""
        bound = 1.0 / math.sqrt(max(self.num_keys, 1))
        with torch.no_grad():
            self.saliency_weight.uniform_(-bound, bound)
            self.saliency_bias.uniform_(-bound, bound)

    def reset_parameters(self) -> None:
        self.key_lin.reset_parameters()
        self.query_lin.reset_parameters()
        self.value_lin.reset_parameters()
        self.reset_saliency()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        saved = state_dict.get(prefix + "keys")
        if isinstance(saved, Tensor) and saved.shape != self.keys.shape:
            if saved.dim() == 2 and saved.size(1) == self.in_channels:
                self._resize(saved.size(0))  # τ follows the saved bank (w_s too)
            # else: let the default loader report the size mismatch
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # --------------------------------------------------------------- forward
    def _start(self, x: Tensor, index, ptr, dim_size, dim):
        if x.dim() == 2 and x.size(-1) != self.in_channels:
            raise ValueError(f"CASiiAggregation: expected x with {self.in_channels} features, got {x.size(-1)}")
        if self.num_keys == 0:
            raise ValueError("CASiiAggregation: no 'keys' set; pass keys=select_negative_keys(negative "
                             "training bags) or call set_keys(...) (models: prepare(train_bags))")
        return self._prepare(x, index, ptr, dim_size, dim, "CASiiAggregation")

    def _pool(self, x: Tensor, s: Tensor, index: Tensor, dim_size: int) -> PoolOutput:
        att = segment_softmax(s / self.temperature, index, dim_size)
        v = F.relu(self.value_lin(x))
        pooled = scatter(att.unsqueeze(-1) * v, index, 0, dim_size, reduce="sum")
        return PoolOutput(pooled, att, s, index)

    def key_direction(self) -> Tensor:
        r"""The folded read-out :math:`u = \sum_j w_{s,j} \hat k_j` ``[D_h]``."""
        k_hat = F.normalize(torch.tanh(self.key_lin(self.keys)), dim=-1, eps=_NORM_EPS)
        return self.saliency_weight @ k_hat

    def saliency(self, x: Tensor) -> Tensor:
        r"""Saliency logits :math:`s_i = \hat q_i^\top u + b_s` ``[N]`` (folded form)."""
        q = torch.tanh(self.query_lin(x))
        norm = q.norm(dim=-1).clamp_min(_NORM_EPS)
        return (q @ self.key_direction()) / norm + self.saliency_bias

    def attend(
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        dim: int = -2,
    ) -> PoolOutput:
        """Pool and return :class:`PoolOutput` (pooled, attention, saliency logits), folded form."""
        index, dim_size = self._start(x, index, ptr, dim_size, dim)
        return self._pool(x, self.saliency(x), index, dim_size)

    def similarity(self, x: Tensor) -> Tensor:
        r"""The explicit cosine matrix :math:`C` ``[N, τ]`` (memory ``O(Nτ)``: tests/benchmarks only)."""
        q_hat = F.normalize(torch.tanh(self.query_lin(x)), dim=-1, eps=_NORM_EPS)
        k_hat = F.normalize(torch.tanh(self.key_lin(self.keys)), dim=-1, eps=_NORM_EPS)
        return q_hat @ k_hat.t()

    def attend_explicit(
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        dim: int = -2,
    ) -> PoolOutput:
        r"""Reference path forming :math:`C` (``N × τ``), as the released CASii code does.

        Same result as :meth:`attend`; for tests and the benchmark only.
        """
        index, dim_size = self._start(x, index, ptr, dim_size, dim)
        s = self.similarity(x) @ self.saliency_weight + self.saliency_bias
        return self._pool(x, s, index, dim_size)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, num_keys={self.num_keys}, "
                f"hidden_channels={self.hidden_channels}, temperature={self.temperature})")
