"""Ctrl-C and SIGTERM during ``conspo train``: finish the step, save a checkpoint, say how to resume.

A scheduler's SIGTERM or a user's Ctrl-C (SIGINT) sets a flag; training goes on to the end of the optimizer step
(to the end of the generation batch when one batch feeds several steps, so the resume is exact), a complete
checkpoint is saved there, and the job stops with exit status 130 (SIGINT) or 143 (SIGTERM) after printing the
``--resume`` command. A second Ctrl-C stops at once (:class:`StopNow`), losing only the steps since the last
checkpoint, as a kill would; a SIGTERM while stopping changes nothing (torchrun answers a Ctrl-C by sending its
workers SIGTERM, and a scheduler follows its SIGTERM with SIGKILL when it will not wait).

Under torchrun / accelerate every process must stop after the same step, or the others would wait forever in
the next collective: the flag is agreed on at each step's end by an all-reduce (max) over the process group,
so a signal that reached one rank only stops them all at the same step.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as a shell reports it
SIGNALS = tuple(EXIT_CODES)


class StopNow(KeyboardInterrupt):
    """The second signal: stop at once, without a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupted(Exception):
    """Training stopped on a signal after saving a complete checkpoint; ``exit_code`` is what the command returns."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = EXIT_CODES[signum]


def resume_command(argv: list[str] | None) -> str:
    """The command that continues an interrupted ``conspo train`` run: the same arguments with ``--resume`` (and
    without ``--overwrite``, which would start again). ``argv``: the arguments after ``conspo``, or None when
    the run was started from Python."""
    if argv is None:
        return "the same train(...) call with resume=True"
    kept = [a for a in argv if a != "--overwrite"]
    if "--resume" not in kept:
        kept.append("--resume")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun / accelerate launch: the same launcher
        return f"the same launch command (torchrun / accelerate launch) with: -m conspo.cli {shlex.join(kept)}"
    return shlex.join(["conspo", *kept])


class GracefulStop:
    """Context manager: while active, SIGINT and SIGTERM ask training to stop after the current step.

    ``signum`` is the first signal received here (None: none); :meth:`agreed` is the signal every process has
    agreed on (0: none), and must be called by every process at the same points (each step's end)."""

    def __init__(self, *, main: bool = True):
        self.signum: int | None = None
        self.main = main  # only the main process prints
        self._previous: dict[int, object] = {}
        self._agreed = 0

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise StopNow(signum)
            return  # a SIGTERM while stopping (torchrun passes a Ctrl-C on as one): the stop goes on
        self.signum = signum
        if self.main:
            print(f"\n[conspo] {signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                  f"(Ctrl-C again stops at once, losing the steps since the last checkpoint)",
                  file=sys.stderr, flush=True)

    def agreed(self) -> int:
        """The signal to stop on, agreed by all processes (max over ranks; 0: carry on). Once set, it stays set."""
        local = self.signum or 0
        if self._agreed:
            return self._agreed
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            flag = torch.tensor([local], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        self._agreed = local
        return local


def stop_callback(stop: GracefulStop, period: int):
    """A ``TrainerCallback`` that ends training on an agreed signal at the next step that is a multiple of
    ``period`` (the optimizer steps one generation batch feeds; 1 in most runs), with a checkpoint saved there.
    ``stop.step`` is then the step the run stopped at."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop.agreed() and state.global_step % period == 0:
                control.should_save = True
                control.should_training_stop = True
                stop.step = state.global_step
            return control

    stop.step = None
    return StopOnSignal()
