"""conspo: contrastive sequence-level policy optimisation (ConSPO) and its baselines for RLVR.

``import conspo`` is light: the math core is ``conspo.objectives`` (torch only), and the TRL classes
are imported on first use, so ``from conspo import ConSPOConfig, ConSPOTrainer`` works without paying
for TRL on every import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "ConSPOConfig": "conspo.trainer",
    "ConSPOTrainer": "conspo.trainer",
    "preset_config": "conspo.presets",
    "preset_reward_funcs": "conspo.presets",
    "METHODS": "conspo.presets",
}

if TYPE_CHECKING:  # pragma: no cover
    from conspo.presets import METHODS, preset_config, preset_reward_funcs
    from conspo.trainer import ConSPOConfig, ConSPOTrainer

__all__ = ["ConSPOConfig", "ConSPOTrainer", "preset_config", "preset_reward_funcs", "METHODS", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'conspo' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
