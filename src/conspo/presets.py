"""Named methods: ConSPO, the paper's seven baselines and its Table 6 ablations as configurations (section 8).

A comparison changes one word::

    config = preset_config("dapo", output_dir="runs/dapo", max_steps=100)
    trainer = ConSPOTrainer(model, reward_funcs=[verifier, *preset_reward_funcs("dapo", config)], args=config, ...)

The baselines that TRL implements run TRL's own loss (``objective="trl"``; ConSPOTrainer adds only the shared
diagnostics); GMPO, which TRL lacks, is ``objective="gmpo"`` on conspo's own loss.

Also the defaults of a run that names nothing: ``DEFAULT_TASK`` and the embedded model's RL settings
``DEFAULT_RL``. This module imports nothing heavy (``conspo --help`` reads its names without torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The paper's seven baselines (arXiv 2605.12969v3, section 5.1) next to ConSPO, then the rows of its Table 6 ablation.
METHODS = ("conspo", "disco", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo", "gmpo")
ABLATIONS = ("conspo_linear_gap", "conspo_clipped_ratio", "conspo_no_margin", "conspo_fixed_margin")

# The settings each method fixes. Anything passed to preset_config overrides them, except the defining fields below.
PRESETS: dict[str, dict[str, Any]] = {
    "conspo": dict(objective="conspo"),
    "disco": dict(objective="disco"),
    "grpo": dict(objective="trl", loss_type="grpo", epsilon=0.2, scale_rewards="group", beta=0.0),
    "dr_grpo": dict(objective="trl", loss_type="dr_grpo", scale_rewards="none", beta=0.0),
    # DAPO with its dynamic sampling, as the ConSPO paper's DAPO baseline has it.
    "dapo": dict(objective="trl", loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
                 mask_truncated_completions=True, dynamic_sampling=True, beta=0.0),
    "gspo": dict(objective="trl", importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4,
                 epsilon_high=4e-4, beta=0.0),
    "cispo": dict(objective="trl", loss_type="cispo", beta=0.0),
    # SAPO: TRL's loss_type="sapo" with its default soft-gate temperatures (sapo_temperature_pos/neg).
    "sapo": dict(objective="trl", loss_type="sapo", beta=0.0),
    # GMPO (arXiv 2507.20673): not in TRL; conspo.objectives.gmpo_loss, clip 0.4 in log space both ways.
    "gmpo": dict(objective="gmpo", beta=0.0),
    # Table 6: InfoNCE replaced by the linear score gap. That is DisCO-basic, here without its trust region.
    "conspo_linear_gap": dict(objective="disco", disco_variant="basic", trust_region=False),
    # Table 6: the log-probability score replaced by the clipped importance ratios of Eq. 6.
    "conspo_clipped_ratio": dict(objective="conspo", score="clipped_ratio"),
    # Table 6: no margin, and a fixed margin (the paper's M = 0.01 from the first step).
    "conspo_no_margin": dict(objective="conspo", margin_max=0.0),
    "conspo_fixed_margin": dict(objective="conspo", margin_schedule="constant"),
}
ALL_METHODS = METHODS + ABLATIONS

DEFAULT_TASK = "arithmetic"
"""The task of ``conspo train`` / ``eval`` / ``compare`` without ``--task`` or ``--dataset``."""

# The RL settings measured to raise held-out greedy accuracy on the default task with the embedded model
# (docs/embedded_default.md): 32 prompts x 8 completions per step; lr 1e-4 (5e-5 gains less, 2e-4 about as much).
# Keys are GRPOConfig fields; ``per_device_train_batch_size`` counts completions.
DEFAULT_RL = dict(
    learning_rate=1e-4,
    lr_scheduler_type="constant",
    warmup_steps=0,
    max_steps=60,
    num_generations=8,
    per_device_train_batch_size=256,  # 32 prompts x 8 completions
    max_completion_length=6,
    temperature=1.0,
    beta=0.0,
)

# The fields that make a preset what its name says; a run labelled with the name cannot change them.
DEFINING_FIELDS = ("objective", "loss_type", "importance_sampling_level", "disco_variant", "score")

# DAPO's soft overlong punishment: when the task does not say how long a complete answer can be, the last quarter
# of the completion budget is penalised linearly (DAPO: 4096 of 20480 tokens).
DAPO_OVERLONG_CACHE_FRACTION = 0.25


def preset_config(method: str, **overrides: Any):
    """A ``ConSPOConfig`` (a TRL ``GRPOConfig``) for ``method`` with ``overrides`` applied on top.

    A preset's defining fields (``DEFINING_FIELDS``: its objective, TRL loss type, ...) cannot be changed under its
    name: ``preset_config("grpo", objective="conspo")`` is refused, so a run is never labelled with another method.
    """
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; accepted values: {', '.join(ALL_METHODS)}")
    from conspo.trainer import ConSPOConfig

    preset = PRESETS[method]
    changed = [f"{k}={overrides[k]!r} (the preset has {preset[k]!r})" for k in DEFINING_FIELDS
               if k in preset and k in overrides and overrides[k] != preset[k]]
    if changed:
        raise ValueError(f"method {method!r} is defined by {', '.join(f'{k}={preset[k]!r}' for k in DEFINING_FIELDS if k in preset)}; "
                         f"these settings would make it another method: {'; '.join(changed)}. Choose the method "
                         f"that has them (accepted: {', '.join(ALL_METHODS)}).")
    return ConSPOConfig(**{**preset, **overrides})


def preset_reward_funcs(method: str, config, *, overlong_after: int | None = None) -> list[Callable]:
    """Extra reward functions a method adds to the task's verifier (DAPO: soft overlong punishment).

    DAPO's punishment is 0 up to ``max_completion_length - cache`` tokens, falls linearly to -1 at
    ``max_completion_length`` and is -1 beyond. ``overlong_after`` (``Task.overlong_after``): the longest a
    complete answer of the task can be, in tokens with end-of-sequence; when given, the window starts there
    (``cache = max_completion_length - overlong_after``), so no complete answer is punished for its length. Without
    it the window is the last ``DAPO_OVERLONG_CACHE_FRACTION`` of the budget, which punishes correct answers whose
    length is close to the budget (a budget set tight to a task's longest answer, as for worked arithmetic).
    """
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; accepted values: {', '.join(ALL_METHODS)}")
    if overlong_after is not None and (isinstance(overlong_after, bool) or not isinstance(overlong_after, int)
                                       or overlong_after < 1):
        raise ValueError(f"overlong_after must be a positive number of tokens or None, got {overlong_after!r}")
    if method != "dapo":
        return []
    from trl.rewards import get_soft_overlong_punishment

    budget = config.max_completion_length
    if overlong_after is not None and overlong_after < budget:
        cache = budget - overlong_after
    else:  # unknown, or the budget leaves no room past the longest answer: the default window
        cache = max(1, int(budget * DAPO_OVERLONG_CACHE_FRACTION))
    punishment = get_soft_overlong_punishment(budget, cache)
    punishment.__name__ = "soft_overlong_punishment"
    return [punishment]
