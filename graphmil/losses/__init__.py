"""Loss modules: AEM, ACMIL diversity, CASii instance losses, AINet terms."""

from graphmil._lazy import lazy_namespace

__getattr__, __dir__ = lazy_namespace(__name__, ["aem", "acmil", "casii", "ainet"])
