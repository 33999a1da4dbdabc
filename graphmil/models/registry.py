"""A small model registry: ``create_model(name, in_channels, num_classes, **kwargs)``."""

from __future__ import annotations

import difflib
from typing import Callable, Dict, List, Type

import torch

__all__ = ["register_model", "create_model", "list_models"]

_REGISTRY: Dict[str, Callable[..., torch.nn.Module]] = {}


def register_model(name: str) -> Callable[[Type], Type]:
    """Class decorator adding a model to the registry under ``name`` (lower case)."""

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


def create_model(name: str, in_channels: int, num_classes: int = 1, **kwargs) -> torch.nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models` (case-insensitive).
        in_channels: instance feature width ``D``.
        num_classes: output width ``C``; ``1`` means a binary task trained with BCE, ``C > 1`` a
            ``C``-class task trained with cross-entropy.
        **kwargs: the model's own hyperparameters.

    Raises:
        ValueError: for an unknown name, listing the known ones (and the closest match).
    """
    _load_builtin()
    key = str(name).lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown model '{name}'.{hint} Known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key](in_channels=in_channels, num_classes=num_classes, **kwargs)


def _load_builtin() -> None:
    # Importing the package's model modules registers them.
    import importlib
    import pkgutil

    import graphmil.models as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("registry", "output", "base"):
            importlib.import_module(f"graphmil.models.{mod.name}")
