"""Attention-free baselines: mean pooling and max pooling of instance embeddings/logits."""

from __future__ import annotations

from typing import Sequence, Union

from torch import Tensor
from torch.nn import Linear
from torch_geometric.utils import scatter

from graphmil.models.abmil import instance_mlp
from graphmil.models.base import MILModel
from graphmil.models.output import MILOutput
from graphmil.models.registry import register_model

__all__ = ["MeanMIL", "MaxMIL", "positive_score"]


def positive_score(logits: Tensor) -> Tensor:
    """One localisation score per row of class logits ``[N, C]``: the logit itself for ``C = 1``,
    ``logit_1 - logit_0`` for ``C = 2``, ``max_{c>0} logit_c - logit_0`` for ``C > 2``."""
    if logits.size(-1) == 1:
        return logits[:, 0]
    return logits[:, 1:].max(dim=-1).values - logits[:, 0]


class _PooledBaseline(MILModel):
    """Instance MLP + linear classifier shared by the attention-free baselines."""

    def __init__(self, in_channels: int, num_classes: int = 1,
                 embed_dim: Union[int, Sequence[int]] = 512, dropout: float = 0.0) -> None:
        super().__init__(in_channels, num_classes)
        widths = [embed_dim] if isinstance(embed_dim, int) else list(embed_dim)
        self.embed = instance_mlp(in_channels, widths, dropout)
        self.classifier = Linear(widths[-1], num_classes)
        self.reset_parameters()


@register_model("meanmil")
class MeanMIL(_PooledBaseline):
    r"""Mean-pooling MIL baseline (embedding-level mean pooling, e.g. Wang et al., PR 2018).

    .. math::
        h_i = f(x_i), \qquad z_b = \frac{1}{|b|}\sum_{i\in b} h_i, \qquad \hat y_b = W_c z_b + b_c .

    Because the classifier is linear, :math:`\hat y_b` is also the mean of the instance logits
    :math:`W_c h_i + b_c`; ``instance_scores`` are those instance logits (reduced by
    :func:`positive_score` for ``C > 1``). ``attention`` is ``None``.

    Args:
        in_channels (int): instance feature width ``D``.
        num_classes (int): bag output width ``C`` (default ``1``).
        embed_dim (int or list of int): embedding width(s) (default ``512``).
        dropout (float): dropout after each embedding layer (default ``0.0``).

    Shapes:
        - **input:** ``Batch`` with ``x [N, D]``, ``batch [N]``.
        - **output:** ``bag_logits [B, C]``, ``instance_scores [N]``, ``batch [N]``.
    """

    def forward(self, batch) -> MILOutput:
        x, index, num_bags = self.unpack(batch)
        h = self.embed(x)
        z = scatter(h, index, 0, num_bags, reduce="mean")
        inst = self.classifier(h)
        return MILOutput(bag_logits=self.classifier(z), instance_scores=positive_score(inst.detach()),
                         batch=index)


@register_model("maxmil")
class MaxMIL(_PooledBaseline):
    r"""Max-pooling MIL baseline (instance-level max pooling, mi-Net; Wang et al., PR 2018).

    .. math::
        s_{i} = W_c f(x_i) + b_c \in \mathbb{R}^C, \qquad \hat y_{b,c} = \max_{i\in b} s_{i,c} .

    ``instance_scores`` are the instance logits :math:`s_i` (reduced by :func:`positive_score` for
    ``C > 1``). ``attention`` is ``None``.

    Args:
        in_channels (int): instance feature width ``D``.
        num_classes (int): bag output width ``C`` (default ``1``).
        embed_dim (int or list of int): embedding width(s) (default ``512``).
        dropout (float): dropout after each embedding layer (default ``0.0``).

    Shapes:
        - **input:** ``Batch`` with ``x [N, D]``, ``batch [N]``.
        - **output:** ``bag_logits [B, C]``, ``instance_scores [N]``, ``batch [N]``.
    """

    def forward(self, batch) -> MILOutput:
        x, index, num_bags = self.unpack(batch)
        inst = self.classifier(self.embed(x))
        bag = scatter(inst, index, 0, num_bags, reduce="max")
        return MILOutput(bag_logits=bag, instance_scores=positive_score(inst), batch=index)
