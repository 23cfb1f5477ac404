#!/usr/bin/env python3
"""Set up conspo in a local virtual environment and run one of its jobs. Needs only Python >= 3.11.

    python3 bootstrap.py train [conspo train options]   # set up, then run the main job on its embedded default
    python3 bootstrap.py test  [pytest options]         # set up with the dev extras, then run the whole test suite
    python3 bootstrap.py bench [benchmark options]      # set up, then run the objectives benchmark
    python3 bootstrap.py shell                          # set up, then print the path of the environment's python

The environment lives in ``.venv`` next to this file and is reused while ``pyproject.toml`` is unchanged.
torch is installed first as ``torch==2.13.0`` when the environment has none, because an unpinned torch
requirement would otherwise pull a multi-GB CUDA build on CPU-only machines.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("CONSPO_VENV", ROOT / ".venv"))
TORCH_PIN = "torch==2.13.0"


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kw)


def setup(extras: str) -> Path:
    if sys.version_info < (3, 11):
        sys.exit(f"conspo needs Python >= 3.11, this is {sys.version.split()[0]}")
    py = _python()
    if not py.exists():
        print(f"creating the virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()[:16]
    stamp = VENV / f".conspo-installed-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == digest:
        return py
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    has_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        _run(pip + [TORCH_PIN])
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    _run(pip + ["-e", target])
    stamp.write_text(digest)
    return py


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"train", "test", "bench", "shell"}:
        print(__doc__)
        return 2
    job, rest = argv[0], argv[1:]
    if job == "test":
        py = setup("dev")
        return subprocess.run([str(py), "-m", "pytest", *rest], cwd=ROOT).returncode
    py = setup("plot,tasks")
    if job == "shell":
        print(py)
        return 0
    if job == "bench":
        return subprocess.run([str(py), str(ROOT / "benchmarks" / "objectives.py"), *rest], cwd=ROOT).returncode
    return subprocess.run([str(py), "-m", "conspo.cli", "train", *rest], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
