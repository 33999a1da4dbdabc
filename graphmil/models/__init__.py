"""Model registry (``create_model``, ``list_models``, accessors) and the typed model output."""

from graphmil.models.base import MILModel, bag_task_loss
from graphmil.models.output import MILOutput
from graphmil.models.registry import (
    check_model_kwargs,
    create_model,
    get_model_class,
    list_models,
    model_description,
    model_parameters,
    register_model,
)

__all__ = ["MILOutput", "MILModel", "bag_task_loss", "create_model", "list_models", "register_model",
           "get_model_class", "model_description", "model_parameters", "check_model_kwargs"]
