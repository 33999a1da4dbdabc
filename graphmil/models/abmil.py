"""ABMIL: attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018)."""

from __future__ import annotations

from typing import Sequence, Union

from torch.nn import Dropout, Linear, ReLU, Sequential

from graphmil.models.base import MILModel
from graphmil.models.output import MILOutput
from graphmil.models.registry import register_model
from graphmil.nn.aggr.attention import AttentionAggregation

__all__ = ["ABMIL", "instance_mlp"]


def instance_mlp(in_channels: int, widths: Sequence[int], dropout: float = 0.0) -> Sequential:
    r"""The instance embedding :math:`f` of ABMIL and the baselines: ``Linear → ReLU (→ Dropout)``
    blocks, :math:`h = \mathrm{ReLU}(W_k \cdots \mathrm{ReLU}(W_1 x + b_1) \cdots + b_k)`.

    Args:
        in_channels (int): input width ``D``.
        widths (list of int): output width of each block.
        dropout (float): dropout after each block (default ``0.0``: none).

    Shapes:
        - **input:** ``[N, D]``; **output:** ``[N, widths[-1]]``.
    """
    layers = []
    last = in_channels
    for w in widths:
        if int(w) < 1:
            raise ValueError(f"instance_mlp: every width must be >= 1, got {list(widths)}")
        layers += [Linear(last, int(w)), ReLU()]
        if dropout > 0:
            layers.append(Dropout(dropout))
        last = int(w)
    return Sequential(*layers)


@register_model("abmil")
class ABMIL(MILModel):
    r"""Attention-based MIL, plain or gated (Ilse, Tomczak & Welling, ICML 2018).

    .. math::
        h_i &= f(x_i) = \mathrm{ReLU}(W_f x_i + b_f) \quad (\text{one or more layers}), \\
        e_i &= w^\top \tanh(V h_i) \;\; \text{or} \;\;
              w^\top\big(\tanh(V h_i) \odot \sigma(U h_i)\big) \;\;(\text{gated}), \\
        a_i &= \operatorname{softmax}_{j \in b}(e_j)_i, \qquad
        z_b = \sum_{i \in b} a_i h_i, \qquad \hat y_b = W_c z_b + b_c .

    ``instance_scores`` are the pre-softmax attention logits :math:`e_i` (the localisation score
    of the paper); ``attention`` is :math:`a`.

    Args:
        in_channels (int): instance feature width ``D``.
        num_classes (int): bag output width ``C`` (default ``1``: binary with BCE).
        embed_dim (int or list of int): width ``M`` of the instance embedding, or the widths of
            several ``Linear+ReLU`` layers (e.g. ``[256, 128, 64]`` for the paper's MUSK network)
            (default ``512``).
        attention_dim (int): attention width ``L`` (default ``128``).
        gated (bool): gated attention (default ``True``).
        dropout (float): dropout after each embedding layer (default ``0.0``).
        attention_dropout (float): dropout in the attention hidden layer (default ``0.0``).

    Shapes:
        - **input:** a ``Batch`` (or one ``Data``) with ``x [N, D]`` and ``batch [N]``.
        - **output:** :class:`MILOutput` with ``bag_logits [B, C]``, ``instance_scores [N]``,
          ``attention [N]``, ``batch [N]``.
    """

    def __init__(self, in_channels: int, num_classes: int = 1,
                 embed_dim: Union[int, Sequence[int]] = 512, attention_dim: int = 128,
                 gated: bool = True, dropout: float = 0.0, attention_dropout: float = 0.0) -> None:
        super().__init__(in_channels, num_classes)
        widths = [embed_dim] if isinstance(embed_dim, int) else list(embed_dim)
        if not widths:
            raise ValueError("ABMIL: 'embed_dim' must be an int or a non-empty list of ints")
        if not 0.0 <= dropout < 1.0 or not 0.0 <= attention_dropout < 1.0:
            raise ValueError(f"ABMIL: 'dropout' and 'attention_dropout' must be in [0, 1), got "
                             f"{dropout} and {attention_dropout}")
        self.embed = instance_mlp(in_channels, widths, dropout)
        self.pool = AttentionAggregation(widths[-1], attention_dim, gated=gated,
                                         dropout=attention_dropout)
        self.classifier = Linear(widths[-1], num_classes)
        self.reset_parameters()

    def forward(self, batch) -> MILOutput:
        x, index, num_bags = self.unpack(batch)
        h = self.embed(x)
        p = self.pool.attend(h, index, dim_size=num_bags)
        return MILOutput(bag_logits=self.classifier(p.pooled), instance_scores=p.logits,
                         attention=p.attention, batch=index)
