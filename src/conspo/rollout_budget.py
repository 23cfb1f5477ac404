"""``max_rollouts``: a training budget counted in generated rollouts, for comparisons at one generation cost.

One job: count the completions generated for training (dynamic sampling's extra rounds included, over every
process) and stop training at the end of the optimizer step that reaches the budget. The count travels in every
checkpoint's ``trainer_state.json`` (an ``ExportableState`` callback), so a resumed run counts on from where it was
instead of starting again at zero; ``max_steps`` still caps the run.
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

__all__ = ["RolloutBudget"]


class RolloutBudget(TrainerCallback, ExportableState):
    def __init__(self, budget: int | None = None, generated: int = 0) -> None:
        self.budget = budget
        self.generated = generated
        self._restored = False

    def count(self, rollouts: int, state) -> None:
        """Add ``rollouts`` just generated; the first call of a resumed run starts from its checkpoint's count."""
        if not self._restored:
            stored = state.stateful_callbacks.get(type(self).__name__)
            if isinstance(stored, dict):
                self.generated = int(stored.get("attributes", {}).get("generated", 0))
            self._restored = True
        self.generated += rollouts

    def on_step_end(self, args, state, control, **kwargs):
        if self.budget is not None and self.generated >= self.budget:
            control.should_training_stop = True

    def state(self) -> dict:
        return {"args": {"budget": self.budget}, "attributes": {"generated": self.generated}}
