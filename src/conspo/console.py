"""What ``conspo train`` shows while it trains: one progress bar per run, and warnings a user can act on.

transformers' progress callback prints each logged dict (TRL's 30 values per step) under the bar; here the bar's
postfix carries the few values one watches (step, reward, held-out accuracy when measured, ConSPO's separation
AUC, seconds per step; tqdm shows the time left), and the full record goes to ``metrics.jsonl`` and
``--report-to`` only. A step where no group has a learning signal (every completion of every group scored the
same) is said at once, the first time, not after many steps; ``--log-completions`` samples are printed as short
lines. Deprecation warnings that transformers raises about its own internals (TRL calls the old names) are
filtered by message and category; every other warning still shows.
"""

from __future__ import annotations

import sys
import time
import warnings

# transformers 5 names it renamed, called by TRL / the trainer itself, not by the user's settings: each warning
# says "`<name>` is deprecated and will be removed in v6" from inside transformers.
INTERNAL_DEPRECATIONS = ("is_gradient_checkpointing", "gradient_checkpointing_enable", "gradient_checkpointing_disable")


def quiet_internal_warnings(user_fields: set[str] = frozenset()) -> None:
    """Hide transformers' deprecation warnings about its internals; ``gradient_checkpointing`` too unless the user
    set that field (then the warning tells them the new name)."""
    names = list(INTERNAL_DEPRECATIONS)
    if "gradient_checkpointing" not in user_fields:
        names.append("gradient_checkpointing")
    for name in names:
        warnings.filterwarnings("ignore", message=rf"`{name}` is deprecated and will be removed in v6",
                                category=FutureWarning, module=r"transformers(\.|$)")


def postfix(logs: dict, heldout: float | None) -> dict[str, str]:
    """The bar's postfix from one logged record."""
    shown = {}
    if "reward" in logs:
        shown["reward"] = f"{logs['reward']:.3f}"
    if heldout is not None:
        shown["held-out"] = f"{heldout:.1%}"
    if "conspo/auc" in logs:
        shown["auc"] = f"{logs['conspo/auc']:.3f}"
    if "step_time" in logs:
        shown["s/step"] = f"{logs['step_time']:.1f}"
    return shown


def no_signal_message(logs: dict, step: int, num_generations: int) -> str | None:
    """The warning for a step where every group was degenerate (``frac_reward_zero_std`` 1), else None."""
    if logs.get("frac_reward_zero_std", 0.0) < 1.0:
        return None
    reward = logs.get("reward")
    level = f" (mean reward {reward:.3f})" if reward is not None else ""
    return (f"step {step}: every group of {num_generations} completions scored the same{level}, so no group has a "
            f"learning signal and this step changed nothing. If this goes on, the task is too hard or too easy for "
            f"the model: raise the temperature or num_generations, check the answer format the verifier expects "
            f"(--log-completions shows completions), or pick a task the model solves sometimes")


def completion_lines(trainer, limit: int) -> list[str]:
    """A few of the newest logged completions as ``prompt -> completion [reward]`` lines (TRL's ``_logs``)."""
    logs = getattr(trainer, "_logs", None)
    if not logs or not logs.get("prompt"):
        return []
    prompts, completions = list(logs["prompt"])[-limit:], list(logs["completion"])[-limit:]
    rewards = {name: list(values)[-limit:] for name, values in logs.get("rewards", {}).items()}

    def text(value) -> str:
        if isinstance(value, list):  # conversational: the last message's content
            value = value[-1].get("content", "") if value and isinstance(value[-1], dict) else str(value)
        flat = " ".join(str(value).split())
        return flat if len(flat) <= 160 else flat[:157] + "..."

    lines = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        scores = ", ".join(f"{name} {values[i]:.2f}" for name, values in rewards.items() if i < len(values))
        lines.append(f"  {text(prompt)!r} -> {text(completion)!r} [{scores}]")
    return lines


def console_callback(*, num_generations: int, main: bool):
    """A ``TrainerCallback`` that replaces transformers' progress and printer callbacks (see the module docstring).
    ``callback.heldout`` is set by the held-out evaluation; ``callback.trainer`` by the caller, for completions."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Console(TrainerCallback):
        heldout: float | None = None
        trainer = None

        def __init__(self):
            self.bar = None
            self.warned = False
            self.started = None

        def write(self, text: str) -> None:
            if main:
                (self.bar.write if self.bar is not None else print)(text, file=sys.stderr)

        def on_train_begin(self, args, state, control, **kwargs):
            if main and not args.disable_tqdm:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                                dynamic_ncols=True)
            self.started = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not main or not logs or "train_runtime" in logs:
                return
            if self.bar is not None:
                self.bar.set_postfix(postfix(logs, self.heldout), refresh=True)
            message = None if self.warned else no_signal_message(logs, state.global_step, num_generations)
            if message is not None:
                self.warned = True
                self.write(f"[conspo] warning: {message}")
            if args.log_completions and self.trainer is not None:
                lines = completion_lines(self.trainer, args.num_completions_to_print or 4)
                if lines:
                    self.write(f"[conspo] step {state.global_step} completions:\n" + "\n".join(lines))

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Console()


def install(trainer, callback) -> None:
    """Put ``callback`` in place of transformers' progress bar and per-step printer on ``trainer``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(callback)
    callback.trainer = trainer
