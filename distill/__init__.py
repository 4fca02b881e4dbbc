"""Stage 2: losses, masking, caption sampling, head-only EMA, the training task and engine.

The objectives are re-exported here from :mod:`distill.objectives`; the training engine lives in
``distill.train`` / ``distill.task`` (import them explicitly).
"""

from .objectives import *  # noqa: F403
from .objectives import __all__ as _objectives_all

__all__ = list(_objectives_all)
