"""luffy-trl: LUFFY (Learning to Reason under Off-Policy Guidance) on top of Hugging Face TRL.

Public API::

    from luffy_trl import MixedPolicyGRPOConfig, MixedPolicyGRPOTrainer

Sub-modules (``luffy_trl.losses``, ``luffy_trl.rewards``, ``luffy_trl.data``, ...) are imported lazily so that
``import luffy_trl.losses`` does not pay for importing TRL.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "MixedPolicyGRPOConfig": "luffy_trl.config",
    "MixedPolicyGRPOTrainer": "luffy_trl.trainer",
}

__all__ = ["MixedPolicyGRPOConfig", "MixedPolicyGRPOTrainer", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'luffy_trl' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from luffy_trl.config import MixedPolicyGRPOConfig
    from luffy_trl.trainer import MixedPolicyGRPOTrainer
