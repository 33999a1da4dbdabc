"""CASii (CASiMIL): negative key bank + saliency cross-attention + instance losses (Su et al., 2024)."""

from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor
from torch.nn import Linear
from torch_geometric.data import Batch, Data

from graphmil.losses.casii import CASiiInstanceLoss
from graphmil.models.base import MILModel, bag_task_loss
from graphmil.models.output import MILOutput
from graphmil.models.registry import register_model
from graphmil.nn.aggr.casii import CASiiAggregation
from graphmil.nn.casii import KeySelection, is_negative_bag, select_negative_keys

__all__ = ["CASii"]


@register_model("casii")
class CASii(MILModel):
    r"""CASii, cross-attention-based salient instance inference MIL (Su et al., 2024).

    .. math::
        a, z = \operatorname{CASiiAggregation}_K(X), \qquad
        \text{logit} = W_c z + b_c, \\
        L = \operatorname{task}(\text{logit}, Y) + \lambda_{\text{bot}} L_{\text{bot}}
            + \lambda_{\text{top}} L_{\text{top}}

    with the key bank :math:`K` built by :meth:`prepare` from the **negative training bags only**
    (:func:`graphmil.nn.casii.select_negative_keys`), the pooling of
    :class:`graphmil.nn.aggr.CASiiAggregation` and the instance terms of
    :class:`graphmil.losses.CASiiInstanceLoss` (after ``warmup_epochs``). For ``num_classes > 1``
    a bag is positive for the instance loss when its class is not ``0`` (class 0 = normal), and
    negative bags for the key bank are those of class 0.

    **A key bank once set is kept.** :attr:`is_prepared` is ``True`` as soon as the bank is non-empty
    -- passed as ``keys=``, built by :meth:`prepare`, or loaded from a checkpoint with
    ``load_state_dict`` -- and the trainer calls :meth:`prepare` only when it is ``False`` (or when a
    rebuild is asked for). So a CASii given ``keys=`` (say 37 keys) trains with those 37 keys; calling
    :meth:`prepare` yourself always rebuilds the bank. ``keys=`` is not part of :meth:`spec` (a tensor):
    the bank travels in the ``state_dict`` (buffer ``pool.keys``).

    Args:
        in_channels (int): instance feature width ``D``.
        num_classes (int): bag output width ``C`` (default ``1``, binary).
        keys (Tensor, optional): a ready key bank ``[τ, D]`` (default ``None``: built by
            :meth:`prepare`, or loaded with ``load_state_dict``).
        hidden_channels (int): ``D_h`` (default ``512``).
        temperature (float): attention softmax temperature ``T`` (default ``1.0``).
        t (int): keys per negative bag at most, for :meth:`prepare` (default ``50``).
        r (int): instances per bag in each instance loss term (default ``5``).
        lambda_bot (float): weight of the bottom-``r`` term (default ``0.5``).
        lambda_top (float): weight of the top-``r`` term (default ``0.5``).
        warmup_epochs (int): epochs before the instance losses start (default ``5``).

    Shapes:
        - **input:** ``Batch`` with ``x [N, D]``, ``batch [N]``, ``y [B]``.
        - **output:** :class:`MILOutput` with ``bag_logits [B, C]``, ``instance_scores`` =
          saliency logits ``[N]``, ``attention [N]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 1,
        keys: Optional[Tensor] = None,
        hidden_channels: int = 512,
        temperature: float = 1.0,
        t: int = 50,
        r: int = 5,
        lambda_bot: float = 0.5,
        lambda_top: float = 0.5,
        warmup_epochs: int = 5,
    ) -> None:
        super().__init__(in_channels, num_classes)
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"CASii: 't' must be an integer >= 1, got {t!r}")
        self.pool = CASiiAggregation(in_channels, keys, hidden_channels, temperature)
        self.classifier = Linear(hidden_channels, num_classes)
        self.instance_loss = CASiiInstanceLoss(r, lambda_bot, lambda_top, warmup_epochs)
        self.key_info: Optional[KeySelection] = None
        self.reset_parameters()

    @property
    def is_prepared(self) -> bool:
        """``True`` when the key bank is non-empty (given as ``keys=``, built by :meth:`prepare` or
        loaded with ``load_state_dict``)."""
        return self.pool.num_keys > 0

    @property
    def keys(self) -> Tensor:
        """The key bank ``[τ, D]`` (a buffer of :attr:`pool`)."""
        return self.pool.keys

    def set_keys(self, keys: Tensor) -> None:
        """Set the key bank (re-initialises the saliency read-out ``w_s``)."""
        self.pool.set_keys(keys)

    def prepare(self, train_bags, progress: bool = True) -> None:
        """(Re)build the key bank from the negative bags (``y == 0``) among ``train_bags``.

        Pass the bags of the **training split only**. The selection details (source of each key,
        skipped bags) are kept in :attr:`key_info`. Re-initialises ``w_s``: build the optimizer
        afterwards. Always rebuilds, even when :attr:`is_prepared` (the trainer checks that first).

        Args:
            train_bags (iterable of Data): the training bags (labelled).
            progress (bool): show the key-selection progress bar (default ``True``).

        Raises:
            ValueError: if a bag has no label, or none of the bags is a usable negative bag.
        """
        negatives = (b for b in train_bags if is_negative_bag(b))
        try:
            info = select_negative_keys(negatives, t=self.t, progress=progress, return_info=True)
        except ValueError as e:
            raise ValueError(f"CASii.prepare: cannot build the key bank from 'train_bags' "
                             f"(needs negative bags, y == 0): {e}") from e
        self.key_info = info
        self.pool.set_keys(info.keys.to(self.pool.keys.device))

    def forward(self, batch: Data | Batch) -> MILOutput:
        if self.pool.num_keys == 0:
            raise ValueError("CASii: the key bank is empty; pass keys=... or call "
                             "model.prepare(train_bags) (negative training bags) before forward")
        x, index, num_bags = self.unpack(batch)
        out = self.pool.attend(x, index, dim_size=num_bags)
        return MILOutput(bag_logits=self.classifier(out.pooled), instance_scores=out.logits,
                         attention=out.attention, batch=index)

    def losses(self, out: MILOutput, batch: Data | Batch, epoch: int = 0) -> Dict[str, Tensor]:
        """``{"task": bag loss, "instance": CASiiInstanceLoss}`` (instance term 0 during warm-up)."""
        num_bags = out.bag_logits.size(0)
        y = batch.y
        return {
            "task": bag_task_loss(out.bag_logits, y),
            "instance": self.instance_loss(out.instance_scores, out.batch, y.reshape(num_bags, -1),
                                           epoch, dim_size=num_bags),
        }

    def reset_parameters(self) -> None:
        self.pool.reset_parameters()
        self.classifier.reset_parameters()

    def extra_repr(self) -> str:
        """The hyperparameters (see :class:`~graphmil.models.MILModel`) and ``num_keys``."""
        return f"{super().extra_repr()}, num_keys={self.pool.num_keys}"
