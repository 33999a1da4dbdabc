"""A small model registry: ``create_model(name, in_channels, num_classes, **kwargs)``, and what the
CLI, the demo and the trainer read about a registered model without building it
(:func:`get_model_class`, :func:`model_description`, :func:`model_parameters`,
:func:`check_model_kwargs`)."""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Any, Callable, Dict, List, Mapping, Type

import torch

__all__ = ["register_model", "create_model", "list_models", "get_model_class", "model_description",
           "model_parameters", "check_model_kwargs"]

_REGISTRY: Dict[str, Callable[..., torch.nn.Module]] = {}


def register_model(name: str) -> Callable[[Type], Type]:
    """Class decorator adding a model to the registry under ``name`` (lower case).

    Args:
        name (str): the registry name (case-insensitive; stored lower case, also as
            ``cls.model_name``).

    Raises:
        ValueError: if another class is already registered under ``name``.
    """

    def deco(cls: Type) -> Type:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"register_model: a model named '{key}' is already registered")
        _REGISTRY[key] = cls
        cls.model_name = key
        return cls

    return deco


def list_models() -> List[str]:
    """Names of every registered model, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type:
    """The class registered under ``name``.

    Args:
        name (str): one of :func:`list_models` (case-insensitive).

    Raises:
        ValueError: for an unknown name, listing the known ones (and the closest match).
    """
    _load_builtin()
    key = str(name).lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown model '{name}'.{hint} Known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def model_description(name: str) -> str:
    """The first paragraph of the model class's own docstring, whitespace collapsed to single
    spaces (``""`` without a docstring).

    Args:
        name (str): a registered model name (case-insensitive).
    """
    doc = inspect.cleandoc(get_model_class(name).__dict__.get("__doc__") or "")
    return " ".join(re.split(r"\n\s*\n", doc, maxsplit=1)[0].split())


def model_parameters(name: str) -> Dict[str, Any]:
    """The model's own constructor hyperparameters and their defaults, in signature order, without
    ``in_channels``/``num_classes`` (``inspect.Parameter.empty`` marks a required one). A constructor
    passing ``**kwargs`` on to its parent's includes the parent's.

    Args:
        name (str): a registered model name (case-insensitive).
    """
    from graphmil.models.base import constructor_parameters

    params, _ = constructor_parameters(get_model_class(name))
    return dict(params)


def check_model_kwargs(name: str, kwargs: Mapping[str, Any], where: str = "model.kwargs") -> None:
    """Check that every key of ``kwargs`` is a hyperparameter of model ``name``.

    Args:
        name (str): a registered model name (case-insensitive).
        kwargs (Mapping): the keyword arguments meant for the model's constructor.
        where (str): where ``kwargs`` came from, prefixed to the message (default
            ``"model.kwargs"``: a config's section).

    Raises:
        ValueError: for an unknown model name (see :func:`get_model_class`), or naming the first
            unknown key, its closest accepted name and all accepted names, e.g.
            ``model.kwargs.embd_dim: unknown argument of model 'abmil'. Did you mean 'embed_dim'?
            Accepted: embed_dim, attention_dim, ...``. A model whose constructor takes ``**kwargs``
            it does not pass on to a named parameter accepts every key.
    """
    from graphmil.models.base import DATA_ARGS, constructor_parameters

    cls = get_model_class(name)
    key_name = str(name).lower()
    accepted, open_ = constructor_parameters(cls)
    for key in kwargs:
        key = str(key)
        if key in DATA_ARGS:
            raise ValueError(f"{where}.{key}: '{key}' of model '{key_name}' is create_model's own argument "
                             f"(set from the data), not one of the model's kwargs")
        if key in accepted or open_:
            continue
        close = difflib.get_close_matches(key, list(accepted), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        names = ", ".join(accepted) if accepted else "(none)"
        raise ValueError(f"{where}.{key}: unknown argument of model '{key_name}'.{hint} Accepted: {names}")


def create_model(name: str, in_channels: int, num_classes: int = 1, **kwargs) -> torch.nn.Module:
    """Build a registered model.

    ``create_model(s["name"], s["in_channels"], s["num_classes"], **s["kwargs"])`` rebuilds a model
    from its :meth:`~graphmil.models.MILModel.spec` ``s``.

    Args:
        name (str): one of :func:`list_models` (case-insensitive).
        in_channels (int): instance feature width ``D``.
        num_classes (int): output width ``C``; ``1`` means a binary task trained with BCE, ``C > 1`` a
            ``C``-class task trained with cross-entropy (default ``1``).
        **kwargs: the model's own hyperparameters (:func:`model_parameters`).

    Raises:
        ValueError: for an unknown name, listing the known ones (and the closest match), or an
            unknown keyword argument (:func:`check_model_kwargs`).
    """
    cls = get_model_class(name)
    check_model_kwargs(name, kwargs)
    return cls(in_channels=in_channels, num_classes=num_classes, **kwargs)


def _load_builtin() -> None:
    # Importing the package's model modules registers them.
    import importlib
    import pkgutil

    import graphmil.models as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("registry", "output", "base"):
            importlib.import_module(f"graphmil.models.{mod.name}")
