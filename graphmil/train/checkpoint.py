"""Checkpoints: written atomically, read back with a clear error, rebuilt into a model."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from graphmil.train.config import TrainConfig

__all__ = ["save_checkpoint", "read_checkpoint", "load_checkpoint", "load_model_state"]


def save_checkpoint(path: str, model: torch.nn.Module, optimizer=None, scheduler=None,
                    epoch: int = 0, config: Optional[TrainConfig] = None,
                    model_spec: Optional[Dict[str, Any]] = None, **state) -> str:
    """Write ``{model, optimizer, scheduler, epoch, config, model_spec, ...}`` to ``path``
    (atomically: a temporary file then ``os.replace``, so an interrupt never leaves half a file)."""
    module = getattr(model, "module", model)
    ckpt = {
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "config": dataclasses.asdict(config) if config is not None else None,
        "model_spec": model_spec,
        **state,
    }
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint file written by :func:`save_checkpoint`.

    Raises:
        ValueError: naming the file when it does not exist, cannot be unpickled (truncated,
            corrupt, not a torch file) or is not a graphmil checkpoint.
    """
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise ValueError(f"checkpoint '{path}' is not readable ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'corrupt file'})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"checkpoint '{path}' is not a graphmil checkpoint (no 'model' state)")
    return ckpt


def load_model_state(model: torch.nn.Module, state: Dict[str, Tensor]) -> None:
    """``model.load_state_dict(state)``, letting buffers whose size depends on the data (CASii's
    key bank) take the checkpoint's shape."""
    own = dict(model.named_buffers())
    params = dict(model.named_parameters())
    for name, value in state.items():
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if name in own and own[name].shape != value.shape:
            mod._buffers[leaf] = torch.empty_like(value)
        elif name in params and params[name].shape != value.shape and params[name].numel() == 0:
            # a parameter sized by the data (CASii's saliency read-out, one weight per key): still
            # empty before the data is seen, so it takes the checkpoint's shape
            mod._parameters[leaf] = torch.nn.Parameter(torch.empty_like(value, device=params[name].device),
                                                       requires_grad=params[name].requires_grad)
    model.load_state_dict(state)


def load_checkpoint(path: str, map_location: str = "cpu") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild the model of a checkpoint written by :func:`graphmil.train.fit` /
    :func:`graphmil.train.cross_validate`.

    Returns:
        ``(model, checkpoint_dict)`` with the model in eval mode.

    Raises:
        ValueError: naming the file if it does not exist, is unreadable, holds no ``model_spec``
            or does not fit the model it names.
    """
    from graphmil.models import create_model

    ckpt = read_checkpoint(path, map_location)
    spec = ckpt.get("model_spec")
    if not spec:
        raise ValueError(f"checkpoint '{path}' has no 'model_spec' (was it written by graphmil.train?)")
    try:
        model = create_model(spec["name"], spec["in_channels"], spec.get("num_classes", 1),
                             **spec.get("kwargs", {}))
        load_model_state(model, ckpt["model"])
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"checkpoint '{path}' does not fit the model it names ({spec.get('name')}): "
                         f"{str(e).splitlines()[0]}") from None
    model.eval()
    return model, ckpt
