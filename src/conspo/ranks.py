"""The main job on several processes (torchrun / accelerate launch): who writes, and where the others wait.

One process (``RANK`` 0, the main one) decides what to do with the output directory, holds its lock, writes
``run.json``, ``metrics.jsonl``, the plots, ``summary.json`` and ``final/`` and runs the held-out evaluations; the
others train beside it and wait for it at :func:`barrier`. Every function here is a no-op in a single process.
The process group is the one ``TrainingArguments`` sets up (through accelerate) when the config is built.
"""

from __future__ import annotations

import os
from typing import Any


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _group_ready() -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait until every process gets here."""
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def from_main(value: Any) -> Any:
    """The main process's ``value``, on every process (picklable values)."""
    if not _group_ready():
        return value
    import torch.distributed as dist

    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def say(text: str) -> None:
    """A ``[conspo]`` line on the console, from the main process only."""
    if is_main():
        print(f"[conspo] {text}", flush=True)
