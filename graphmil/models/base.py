"""Base class of graphmil's MIL models."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import Batch, Data

from graphmil.models.output import MILOutput

__all__ = ["MILModel", "bag_task_loss"]


def bag_task_loss(logits: Tensor, y: Tensor, pos_weight: Tensor | None = None,
                  class_weight: Tensor | None = None) -> Tensor:
    """Bag classification loss: BCE-with-logits when ``C == 1`` (or multi-label float targets
    ``[B, C]``), cross-entropy for ``C > 1`` class indices.

    Args:
        logits: ``[B, C]``.
        y: ``[B]`` labels (0/1 or class index) or ``[B, C]`` multi-label targets.
        pos_weight: optional BCE positive-class weight.
        class_weight: optional CE class weights ``[C]``.
    """
    if logits.dim() != 2:
        raise ValueError(f"bag_task_loss: logits must be [B, C], got {tuple(logits.shape)}")
    if y is None:
        raise ValueError("bag_task_loss: the batch has no bag label 'y' (make_bag(..., y=...))")
    if y.numel() != logits.size(0) and not (y.dim() == 2 and y.shape == logits.shape):
        raise ValueError(f"bag_task_loss: {logits.size(0)} bags but labels of shape {tuple(y.shape)}")
    if logits.size(1) == 1:
        return F.binary_cross_entropy_with_logits(logits.view(-1), y.view(-1).to(logits.dtype),
                                                  pos_weight=pos_weight)
    if y.dim() == 2 and y.shape == logits.shape:
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), pos_weight=pos_weight)
    return F.cross_entropy(logits, y.view(-1).long(), weight=class_weight)


#: Constructor arguments that are not hyperparameters: they come from the data.
DATA_ARGS = ("in_channels", "num_classes")


def constructor_parameters(cls: type) -> Tuple[Dict[str, Any], bool]:
    """``({name: default}, open)`` of the hyperparameters ``cls(...)`` accepts besides
    ``in_channels``/``num_classes``, in signature order (``inspect.Parameter.empty`` for a required
    one). A constructor taking ``**kwargs`` (or ``*args``) passes them on to its parent's, whose
    parameters are then accepted too; ``open`` is ``True`` when such arguments reach no named
    parameter (the class may consume any keyword itself), so that no name can be rejected."""
    params: Dict[str, Any] = {}
    passes_on = False
    for klass in cls.__mro__:
        if klass in (MILModel, torch.nn.Module, object):
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        passes_on = False
        for p in inspect.signature(inspect.unwrap(init)).parameters.values():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                passes_on = True
            elif p.name != "self" and p.name not in DATA_ARGS and p.name not in params:
                params[p.name] = p.default
        if not passes_on:
            break
    return params, passes_on


def _bound_hparams(cls: type, sig: inspect.Signature, args, kwargs) -> Dict[str, Any] | None:
    # The hyperparameters of one constructor call (defaults filled in, in signature order), or None
    # when the call does not bind (the constructor then raises its own TypeError) or passes
    # positional *args on (the parent constructor, which names them, records them instead).
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    given: Dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        elif kind is inspect.Parameter.VAR_KEYWORD:
            given.update(value)
        elif name != "self" and name not in DATA_ARGS:
            given[name] = value
    defaults, _ = constructor_parameters(cls)
    out = {k: given.pop(k, d) for k, d in defaults.items() if k in given or d is not inspect.Parameter.empty}
    out.update(given)
    return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in out.items()}


def _short(value: Any) -> str:
    # a hyperparameter in the repr: a tensor as its shape, a tuple as the list the spec holds
    if isinstance(value, Tensor):
        return f"Tensor{list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return repr(value)


def _plain(value: Any, where: str) -> Any:
    # a JSON/YAML-safe copy of a hyperparameter value (tuples become lists)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0 and not isinstance(value, Tensor):
        return value.item()  # a numpy scalar
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"spec(): the hyperparameter {where} is a {type(value).__name__}, which a JSON/YAML "
                    f"model spec cannot hold; pass plain values (numbers, strings, lists, dicts)")


class MILModel(torch.nn.Module):
    """Base of every registered model.

    Subclasses implement ``forward(batch) -> MILOutput`` and may override :meth:`losses` to add
    method-specific terms (DSMIL's instance stream, ACMIL branches, CASii instance losses, AINet
    regions). The trainer adds attention entropy (AEM) on ``MILOutput.attention`` when asked.

    **Hyperparameters are recorded once.** Every constructor argument except ``in_channels`` and
    ``num_classes`` -- defaults filled in, values as passed -- is captured when the model is built
    (``__init_subclass__`` wraps each subclass's ``__init__`` and binds the call to its signature;
    when a subclass calls ``super().__init__(...)``, the outermost constructor's arguments are the
    ones recorded). Subclasses write no ``self.x = x`` and no ``extra_repr``: from that one record
    come :attr:`hparams`, an attribute per hyperparameter (``model.embed_dim``; read-only by
    convention), the ``repr`` (:meth:`extra_repr`) and :meth:`spec`, from which the trainer derives
    its checkpoints and cache keys. A constructor taking ``**kwargs`` it passes to its parent gets
    them recorded under their own names.

    Args:
        in_channels (int): instance feature width ``D``.
        num_classes (int): bag output width ``C`` (``1`` = binary with BCE).

    Shapes:
        - **input:** a ``Data`` (one bag) or ``Batch`` with ``x [N, D]`` and ``batch [N]`` (plus
          ``edge_index``/``pos``/``region`` where a model needs them); ``y [B]`` or ``[B, C]`` for
          :meth:`losses`.
        - **output:** :class:`~graphmil.models.MILOutput` (``bag_logits [B, C]``, ``instance_scores [N]``).
    """

    model_name: str = "base"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_hparams", False):
            return
        sig = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            d = self.__dict__
            depth = d.get("_hparams_depth", 0)
            if depth == 0:  # the outermost constructor of this call records the hyperparameters
                hp = _bound_hparams(cls, sig, (self,) + args, kw)
                if hp is None:
                    return init(self, *args, **kw)
                MILModel._record_hparams(self, hp)
            d["_hparams_depth"] = depth + 1
            try:
                init(self, *args, **kw)
            finally:
                if depth == 0:
                    d.pop("_hparams_depth", None)
                else:
                    d["_hparams_depth"] = depth

        __init__._records_hparams = True
        cls.__init__ = __init__

    def _record_hparams(self, hp: Dict[str, Any]) -> None:
        # Before the constructor body runs, so that it (and reset_parameters) can read self.<name>.
        d = self.__dict__
        d["_hparams"] = hp
        for name, value in hp.items():
            attr = inspect.getattr_static(type(self), name, None)
            if not name.startswith("_") and not hasattr(type(attr), "__get__"):  # no property/method
                d[name] = value

    def __init__(self, in_channels: int, num_classes: int = 1) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"{type(self).__name__}: in_channels and num_classes must be >= 1, "
                             f"got {in_channels} and {num_classes}")
        self.__dict__.setdefault("_hparams", {})
        self.in_channels = in_channels
        self.num_classes = num_classes

    @property
    def hparams(self) -> Dict[str, Any]:
        """The constructor's hyperparameters (all but ``in_channels``/``num_classes``), defaults
        filled in, as passed (a copy)."""
        return dict(self.__dict__.get("_hparams", {}))

    def spec(self) -> Dict[str, Any]:
        """``{"name", "in_channels", "num_classes", "kwargs"}``: what rebuilds this model,
        JSON/YAML-serialisable (tuples become lists).

        ``create_model(s["name"], s["in_channels"], s["num_classes"], **s["kwargs"])`` builds an
        equal model (same ``repr``, same ``state_dict`` keys and shapes). A tensor argument (CASii's
        ``keys=``) is left out: such state travels in the ``state_dict`` (load it into the rebuilt
        model). An unregistered subclass that keeps its registered parent's constructor is described
        as that parent.

        Raises:
            ValueError: if the class is neither registered nor a subclass keeping the constructor of the
                class registered under its ``model_name``.
            TypeError: naming a hyperparameter whose value is not a plain number, string, list or dict.
        """
        from graphmil.models import registry

        registry._load_builtin()
        cls, registered = type(self), registry._REGISTRY.get(self.model_name)
        # an unregistered subclass that keeps the registered class's constructor (overriding, say,
        # prepare or forward only) is rebuilt as that class; one with its own constructor cannot be
        if registered is not cls and not (isinstance(registered, type) and issubclass(cls, registered)
                                          and cls.__init__ is registered.__init__):
            raise ValueError(f"spec(): {cls.__name__} is not registered and has its own constructor "
                             f"(decorate it with @register_model(name)); create_model could not rebuild it")
        kwargs = {k: _plain(v, f"'{k}' of model '{self.model_name}'")
                  for k, v in self.hparams.items() if not isinstance(v, Tensor)}
        return {"name": self.model_name, "in_channels": int(self.in_channels),
                "num_classes": int(self.num_classes), "kwargs": kwargs}

    @property
    def is_prepared(self) -> bool:
        """Whether :meth:`prepare` has nothing (left) to do; ``True`` for models without a data-built
        state. The trainer calls :meth:`prepare` only when this is ``False`` or a rebuild is asked for."""
        return True

    def unpack(self, batch: Data | Batch):
        """``(x, batch_index, num_bags)`` of a ``Data`` (one bag) or ``Batch``."""
        x = batch.get("x") if hasattr(batch, "get") else getattr(batch, "x", None)
        if x is None:
            raise ValueError("the batch has no 'x' (instance features [N, D])")
        if x.dim() != 2 or x.size(1) != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected x [N, {self.in_channels}] (in_channels={self.in_channels}), "
                f"got shape {tuple(x.shape)}"
            )
        index = batch.get("batch")
        if index is None:
            index = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
            num_bags = 1
        else:
            num_bags = int(batch.num_graphs) if hasattr(batch, "num_graphs") else int(index.max()) + 1
        return x, index, num_bags

    def prepare(self, train_bags, progress: bool = True) -> None:
        """Build the model's data-derived state from the bags of the *training split only* (an
        iterable of ``Data``); CASii builds its negative key bank here. Called by the trainer before
        fitting when :attr:`is_prepared` is ``False`` (or a rebuild is asked for); calling it always
        (re)builds. Default: nothing.

        Args:
            train_bags (iterable of Data): the training bags.
            progress (bool): show a progress bar where the work is long (default ``True``).
        """

    def losses(self, out: MILOutput, batch: Data | Batch, epoch: int = 0) -> Dict[str, Tensor]:
        """Named loss terms for one batch; their sum is minimised. Default: the bag task loss
        plus ``out.aux_losses``."""
        terms = {"task": bag_task_loss(out.bag_logits, batch.y)}
        terms.update(out.aux_losses)
        return terms

    def reset_parameters(self) -> None:
        """Re-initialise every submodule that has ``reset_parameters``."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def extra_repr(self) -> str:
        """``in_channels=…, num_classes=…`` and every hyperparameter (a tensor as its shape);
        subclasses may append derived state (CASii: ``num_keys``)."""
        parts = [f"in_channels={self.in_channels}", f"num_classes={self.num_classes}"]
        parts += [f"{k}={_short(v)}" for k, v in self.hparams.items()]
        return ", ".join(parts)
