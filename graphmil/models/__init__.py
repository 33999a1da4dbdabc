"""Model registry (``create_model``, ``list_models``) and the typed model output."""

from graphmil.models.base import MILModel, bag_task_loss
from graphmil.models.output import MILOutput
from graphmil.models.registry import create_model, list_models, register_model

__all__ = ["MILOutput", "MILModel", "bag_task_loss", "create_model", "list_models", "register_model"]
