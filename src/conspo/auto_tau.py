"""``tau="auto"``: ConSPO's temperature measured once, from the first optimizer step that holds a mixed group.

One job: the calibration and its memory. The measurement is the median within-group score sd of the step's kept
rollouts (``score_sd`` of ``conspo.diagnostics.separation_metrics``) times ``tau_auto_factor``, clamped to the
accepted range [TAU_MIN, TAU_MAX]; a step without a mixed group measures nothing (its loss is zero whatever tau is)
and the next one tries again. The :class:`_AutoTau` callback carries the chosen value in every checkpoint's
``trainer_state.json``, so that a resumed run goes on with the same tau instead of measuring a new one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from conspo.diagnostics import separation_metrics
from conspo.objectives import TAU_MAX, TAU_MIN

__all__ = ["Calibration", "calibrate"]


class Calibration(NamedTuple):
    tau: float  # the temperature chosen for the rest of the run
    note: str  # what was measured, for the log


def calibrate(rows: dict[str, torch.Tensor], factor: float) -> Calibration | None:
    """The temperature from one optimizer step's ``scores``, ``correct``, ``group_ids`` and ``keep`` (all (B,)),
    or None when the step has no mixed group."""
    keep = rows["keep"]
    metrics = separation_metrics(rows["scores"][keep], rows["correct"][keep], rows["group_ids"][keep])
    if float(metrics["valid_frac"]) == 0:
        return None
    sd = float(metrics["score_sd"])
    spread = sd * factor
    tau = min(max(spread, TAU_MIN), TAU_MAX)
    clamped = "" if tau == spread else f", clamped to [{TAU_MIN:g}, {TAU_MAX:g}]"
    return Calibration(tau, f"tau='auto': tau = {tau:.6g} (median within-group score sd {sd:.6g} x tau_auto_factor "
                            f"{factor:g}{clamped}), fixed for the rest of the run")


class _AutoTau(TrainerCallback, ExportableState):
    """Holds the temperature chosen by ``tau='auto'`` and writes it into every checkpoint. Its class name is the
    key under which checkpoints store it (``stateful_callbacks._AutoTau``): renaming it would orphan them."""

    def __init__(self, tau: float | None = None) -> None:
        self.tau = tau

    def state(self) -> dict:
        return {"args": {}, "attributes": {"tau": self.tau}}

    def restore(self, stateful_callbacks: dict) -> None:
        """Take the value a checkpoint stored, if this run resumed from one that had chosen it."""
        stored = stateful_callbacks.get(type(self).__name__)
        if isinstance(stored, dict) and stored.get("attributes", {}).get("tau") is not None:
            self.tau = float(stored["attributes"]["tau"])
