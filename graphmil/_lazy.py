"""Lazy package namespaces: ``from graphmil.transforms import GridGraph`` imports only what it needs."""

from __future__ import annotations

import importlib
from typing import Callable, List, Sequence, Tuple


def lazy_namespace(package: str, submodules: Sequence[str]) -> Tuple[Callable, Callable]:
    """Return ``(__getattr__, __dir__)`` for ``package`` exposing the public names of ``submodules``.

    Each public name (``__all__``) of the submodules becomes an attribute of the package, imported
    on first access.
    """

    def _modules():
        for sub in submodules:
            try:
                yield importlib.import_module(f"{package}.{sub}")
            except ModuleNotFoundError as e:  # a submodule not written yet / optional
                if e.name != f"{package}.{sub}":
                    raise

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for mod in _modules():
            if name in getattr(mod, "__all__", ()):
                return getattr(mod, name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    def __dir__() -> List[str]:
        names: List[str] = []
        for mod in _modules():
            names.extend(getattr(mod, "__all__", ()))
        return sorted(set(names))

    return __getattr__, __dir__
