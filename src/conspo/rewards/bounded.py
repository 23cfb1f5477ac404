"""Run a function under a wall-clock bound, in the main thread and in worker threads alike.

Why not math-verify's own ``parsing_timeout`` / ``timeout_seconds``: they use ``signal.alarm``, which takes
whole seconds, replaces any SIGALRM handler without re-arming the previous timer, and raises ``ValueError``
outside the main thread (TRL calls synchronous reward functions in the main thread, but async reward
functions run on an event-loop thread, and evaluation code may use thread pools). So verifiers call
math-verify with its timeouts off and bound the call here:

- **Main thread** (POSIX): ``signal.setitimer(ITIMER_REAL)`` with sub-second resolution and a handler that
  raises a private ``BaseException`` (math-verify catches ``Exception`` but not ``BaseException``). If the
  code swallows it with a bare ``except:``, the timer fires again every 50 ms until the call returns. A
  timer that was already armed (pytest-timeout, a caller's own alarm) is restored afterwards, with the time
  spent here deducted. Cost: two system calls per call. Limit: a single C call that never returns to the
  interpreter (e.g. one enormous integer power) is not interrupted; callers cap input sizes for that.
- **Any other thread** (POSIX): the call is sent to a worker *process* (``_worker_main`` below, started
  on first use; its start-up is not counted in the bound) over a pipe as one JSON line. The worker
  applies the timer above in its own main thread; if no answer comes back within the bound plus 0.5 s, the
  worker is killed, so even a stuck C call is reclaimed. Idle workers are reused (one per concurrent
  caller). The function therefore must be importable by ``module:qualname`` and take and return JSON values.
- Elsewhere (no ``setitimer``, e.g. Windows) the call runs unbounded, with a one-time warning.

Why not pebble's ``ProcessPool`` with a per-task ``timeout`` (measured with pebble 5.2.3 on this project's
CPU machine, issue 18): (1) a pool task is pickled, so a closure cannot be bounded ("Can't pickle local
object" under the fork, forkserver and spawn contexts alike), yet ``make_reward_func(verifier, timeout_s)``
bounds whatever verifier it is given, closures included (``reasoning_gym_verifier``'s, a task's, a test's);
the timer here runs it in place. (2) A call through the pool costs 0.5-0.9 ms, against 0.01 ms for the timer
and 0.24 ms for the worker here. (3) pebble enforces its timeout by killing the worker: a replacement takes
0.3-0.4 s to start (forkserver, spawn; fork is unsafe in a process with other threads, which a caller in a
worker thread is) and 3.7-4.5 s more before its first math-verify call returns, so every sympy timeout would
stall the next call by seconds, where the timer here interrupts sympy and keeps the worker. So pebble could
replace only the worker-process half (about 120 lines), and only with this module's timer inside its tasks:
a new dependency for no new guarantee.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("conspo.rewards")

KILL_GRACE_S = 0.5
"""Extra time a worker process gets beyond the bound before it is killed."""
STARTUP_TIMEOUT_S = 120.0
"""How long a new worker process may take to import its modules and report ready."""
MAX_IDLE_WORKERS = 8


class _Deadline(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that ``except Exception`` blocks do not eat it."""


def _run_with_timer(fn: Callable[..., Any], args: tuple, timeout_s: float) -> Any:
    """Main-thread bound via ``setitimer``; raises ``TimeoutError``."""
    state = {"armed": True}

    def on_alarm(signum, frame):
        if state["armed"]:
            signal.setitimer(signal.ITIMER_REAL, 0.05)  # fire again if the code swallows the exception
            raise _Deadline

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            return fn(*args)
        except _Deadline:
            raise TimeoutError(f"{_name(fn)} exceeded {timeout_s:g} s") from None
        finally:
            while True:  # the alarm may fire once more before it is disarmed: retry until it is
                try:
                    state["armed"] = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    break
                except _Deadline:
                    continue
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # give back the caller's timer, less the time spent here
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-6), old_interval)


def _name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(path: str) -> Callable[..., Any]:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


_WORKER_COMMAND = "import sys; from conspo.rewards.bounded import _worker_main; _worker_main(sys.argv[1:])"


class _Worker:
    """One worker process speaking JSON lines over its stdin/stdout."""

    def __init__(self, preload: tuple[str, ...]):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _WORKER_COMMAND, *preload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self._buffer = b""
        reply = self._read_line(STARTUP_TIMEOUT_S)
        if reply is None or json.loads(reply).get("ready") is not True:
            self.kill()
            raise RuntimeError(f"the verifier worker process did not start (reply {reply!r})")

    def _read_line(self, timeout_s: float) -> bytes | None:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the worker died
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def call(self, path: str, args: tuple, timeout_s: float) -> dict:
        request = json.dumps({"fn": path, "args": list(args), "timeout_s": timeout_s}) + "\n"
        try:
            self.proc.stdin.write(request.encode())
            self.proc.stdin.flush()
        except OSError as error:
            self.kill()
            raise RuntimeError("the verifier worker process is gone") from error
        line = self._read_line(timeout_s + KILL_GRACE_S)
        if line is None:
            self.kill()
            return {"timeout": True}
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:  # a broken pipe may fail to flush on close
                pass


_idle: dict[tuple[str, ...], list[_Worker]] = {}  # idle workers by the modules they preloaded
_idle_lock = threading.Lock()
_warned_unbounded = False


def _run_in_worker(fn: Callable[..., Any], args: tuple, timeout_s: float, preload: tuple[str, ...]) -> Any:
    with _idle_lock:
        idle = _idle.setdefault(preload, [])
        worker = idle.pop() if idle else None
    if worker is None or not worker.alive():
        worker = _Worker(preload)
    reply = worker.call(_name(fn), args, timeout_s)
    if worker.alive():
        with _idle_lock:
            idle = _idle.setdefault(preload, [])
            if len(idle) < MAX_IDLE_WORKERS:
                idle.append(worker)
                worker = None
        if worker is not None:
            worker.kill()
    if reply.get("timeout"):
        raise TimeoutError(f"{_name(fn)} exceeded {timeout_s:g} s (worker process)")
    if "error" in reply:
        raise RuntimeError(f"{_name(fn)} failed in the worker process: {reply['error']}")
    return reply["value"]


@atexit.register
def shutdown_workers() -> None:
    """Kill the idle worker processes (also run at interpreter exit)."""
    with _idle_lock:
        workers = [worker for idle in _idle.values() for worker in idle]
        _idle.clear()
    for worker in workers:
        worker.kill()


def call_with_timeout(
    fn: Callable[..., Any],
    args: tuple = (),
    timeout_s: float = 2.0,
    *,
    isolate: bool = False,
    preload: tuple[str, ...] = (),
) -> Any:
    """``fn(*args)``, or ``TimeoutError`` once ``timeout_s`` seconds have passed (see the module docstring).

    ``isolate=True`` uses a worker process even in the main thread (a bound that also holds for C calls).
    ``preload`` names modules a new worker imports (or calls the ``"module:function"`` entries) before it reports
    ready; that time is not counted in the bound. ``timeout_s <= 0`` or None runs the call unbounded.
    """
    if timeout_s is None or timeout_s <= 0:
        return fn(*args)
    if not hasattr(signal, "setitimer") or os.name != "posix":
        global _warned_unbounded
        if not _warned_unbounded:
            logger.warning("no setitimer on this platform: verifier calls run without a time bound")
            _warned_unbounded = True
        return fn(*args)
    # A SIGALRM handler installed outside Python (getsignal gives None) could not be restored: use a worker.
    main = threading.current_thread() is threading.main_thread()
    if not isolate and main and signal.getsignal(signal.SIGALRM) is not None:
        return _run_with_timer(fn, args, timeout_s)
    return _run_in_worker(fn, args, timeout_s, preload)


def _worker_main(preload: list[str]) -> None:
    """The worker process: import ``preload``, say ready, then answer one JSON request per line."""
    out = os.fdopen(os.dup(1), "w")  # the protocol channel; anything else printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for name in preload:  # "module" is imported, "module:function" is called
        _resolve(name)() if ":" in name else importlib.import_module(name)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            value = _run_with_timer(_resolve(request["fn"]), tuple(request["args"]), request["timeout_s"])
            reply = {"value": value}
        except TimeoutError:
            reply = {"timeout": True}
        except Exception as error:  # reported to the caller, which raises it
            reply = {"error": f"{type(error).__name__}: {error}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()

