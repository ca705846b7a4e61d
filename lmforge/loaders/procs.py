"""Worker processes for the streaming loaders: start, report errors, stop.

Workers are forked: the lane code they run needs only numpy, orjson and the tokenizer, all already in
memory, so a fork starts in milliseconds and nothing is pickled. They ignore SIGINT (Ctrl-C in a
terminal reaches the whole process group; the main process decides what happens) and leave on their
own when the main process is gone.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import pickle
import signal
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from lmforge.errors import ConfigError

POLL_S = 0.2  # how often a waiting worker checks that its parent still lives
JOIN_S = 5.0  # how long a stop request waits before terminating


class RemoteTraceback(Exception):
    """The traceback of an error raised in a loader worker (attached as the error's cause)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\nin the loader worker:\n{self.tb}"


def fork_context() -> Any:
    if "fork" not in mp.get_all_start_methods():
        raise ConfigError("data.loader = \"workers\" / \"ring\" need fork() (Linux, macOS); use \"naive\" here")
    return mp.get_context("fork")


def start(ctx: Any, target: Callable, args_per_worker: list[tuple]) -> list[Any]:
    """Start one daemon process per args tuple, with SIGINT held off until each has set its handler."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        procs = [ctx.Process(target=target, args=args, daemon=True, name=f"lmforge-loader-{i}")
                 for i, args in enumerate(args_per_worker)]
        for p in procs:
            p.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return procs


def worker_setup() -> int:
    """First thing in a worker: ignore Ctrl-C, default SIGTERM; returns the parent's pid to watch."""
    gc.freeze()  # what the parent left for collection must not be finalized here (its temp dirs, its workers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    return os.getppid()


def parent_alive(ppid: int) -> bool:
    return os.getppid() == ppid


def error_message(exc: BaseException) -> tuple[str, bytes | None, str]:
    """("error", the pickled exception if it pickles, its formatted traceback)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        payload: bytes | None = pickle.dumps(exc)
        pickle.loads(payload)
    except Exception:  # an exception that does not round-trip: its traceback text still does
        payload = None
    return "error", payload, tb


def raise_remote(payload: bytes | None, tb: str, what: str) -> None:
    """Raise the worker's exception here, with its traceback as the cause (as concurrent.futures does)."""
    exc: BaseException = pickle.loads(payload) if payload else RuntimeError(f"{what} failed")
    exc.__cause__ = RemoteTraceback(tb)
    raise exc


class WorkerDied(RuntimeError):
    def __init__(self, proc: Any, what: str) -> None:
        super().__init__(f"{what} (pid {proc.pid}) died with exit code {proc.exitcode}; "
                         "see its output above (out of memory?)")
        self.exitcode = proc.exitcode

    @property
    def terminated(self) -> bool:
        """Killed by SIGTERM, as a scheduler stopping the whole job does: worth a restart, not a crash."""
        return self.exitcode == -signal.SIGTERM


def stop(procs: list[Any], request: Callable[[], None] | None = None) -> None:
    """Ask the workers to leave, wait a little, then terminate and finally kill what is left; reap all."""
    if request is not None:
        with contextlib.suppress(Exception):  # pipes already closed: the workers see EOF instead
            request()
    for p in procs:
        p.join(JOIN_S if p.is_alive() else None)
    for sig_name in ("terminate", "kill"):
        for p in procs:
            if p.is_alive():
                getattr(p, sig_name)()
                p.join(JOIN_S)
    for p in procs:
        with contextlib.suppress(ValueError):
            p.close()


@contextlib.contextmanager
def reporting(send: Callable[[tuple], None]) -> Iterator[None]:
    """In a worker: any error leaves as a message to the main process instead of a dead process."""
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 (KeyboardInterrupt too: the parent must hear of it)
        with contextlib.suppress(Exception):
            send(error_message(exc))
