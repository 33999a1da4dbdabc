"""Instance masks for attention pools (STKIM, random subsets, NaN-free logit masking).

The implementation lives in :mod:`graphmil.ops.masking` (below both :mod:`graphmil.nn` and
:mod:`graphmil.transforms`); this module re-exports its public names so that
``from graphmil.nn.masking import stkim_mask`` keeps working.
"""

from __future__ import annotations

from graphmil.ops.masking import mask_logits, random_instance_mask, stkim_count, stkim_mask

__all__ = ["stkim_mask", "random_instance_mask", "mask_logits", "stkim_count"]
