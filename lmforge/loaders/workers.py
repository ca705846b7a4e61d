"""v1, the assembly line: one worker process per lane, batches through bounded queues.

Each batch is a tensor in shared memory made for it (`share_memory_()`); the queue carries a file
descriptor to it, which the main process maps: the way torch's DataLoader moves batches. A queue holds
up to `slots` batches, so every worker runs that far ahead. Compared with the ring loader, every batch
pays for a new shared segment, a descriptor hand-over and a pickled message.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import weakref
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as tmp

from lmforge.loaders import procs
from lmforge.loaders.streaming import LaneSpec, StreamingLoader


def _queue_worker(spec: LaneSpec, lane: int, width: int, out: Any, stop: Any) -> None:
    ppid = procs.worker_setup()
    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    out.cancel_join_thread()  # at exit, never wait for the main process to drain the queue
    # the queue's feeder thread and the descriptor server thread wait for the GIL between tokenizer
    # calls; a short switch interval hands it over in well under a millisecond instead of 5 ms
    sys.setswitchinterval(2e-4)

    def put(msg: tuple) -> None:
        while not stop.is_set() and procs.parent_alive(ppid):
            try:
                out.put(msg, timeout=procs.POLL_S)
                return
            except queue.Full:
                pass

    with procs.reporting(put):
        lane_obj = spec.make(lane)
        while not stop.is_set():
            batch = torch.empty(width, dtype=torch.int64).share_memory_()
            if not lane_obj.fill(batch.numpy()):
                put(("end",))
                break
            put(("batch", batch, lane_obj.state()))
    # the main process maps each batch through a descriptor this process serves: stay until told
    while procs.parent_alive(ppid) and not stop.wait(procs.POLL_S):
        pass


def _shutdown(workers: list[Any], stop: Any, queues: list[Any]) -> None:
    procs.stop(workers, stop.set)
    for q in queues:
        q.cancel_join_thread()
        q.close()


class WorkersLoader(StreamingLoader):
    """v1: worker processes, per-batch shared-memory tensors, bounded prefetch queues."""

    kind = "workers"

    def _start(self) -> None:
        ctx = procs.fork_context()
        tctx = tmp.get_context(ctx.get_start_method())
        spec = self.lane_spec()
        live = [lane for lane in range(self.lanes) if not self._done[lane]]
        self._queues = {lane: tctx.Queue(maxsize=self.slots) for lane in live}
        stop = tctx.Event()
        workers = procs.start(tctx, _queue_worker, [(spec, lane, self.batch_tokens, self._queues[lane], stop)
                                                    for lane in live])
        self._procs = dict(zip(live, workers, strict=True))
        self._finalizer = weakref.finalize(self, _shutdown, workers, stop, list(self._queues.values()))

    def _take(self, lane: int) -> tuple[np.ndarray, dict, bool] | None:
        if getattr(self, "_finalizer", None) is None or not self._finalizer.alive:
            self._start()
        q, proc = self._queues[lane], self._procs[lane]
        while True:
            try:
                msg = q.get(timeout=procs.POLL_S)
                break
            except queue.Empty:
                if proc.is_alive():
                    continue
            except OSError:  # a batch whose maker died before handing it over
                proc.join(procs.JOIN_S)
            err = procs.WorkerDied(proc, f"workers loader worker {lane}")
            self.close()
            raise err
        if msg[0] == "error":
            self.close()
            procs.raise_remote(msg[1], msg[2], f"workers loader worker {lane}")
        if msg[0] == "end":
            return None
        return msg[1].numpy(), msg[2], True

    def close(self) -> None:
        """Stop the workers; iterating again restarts them from the saved state."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        with contextlib.suppress(AttributeError):
            del self._queues
        super().close()
