"""v2, the ring loader: worker processes fill a fixed pool of shared batch slots.

All slots live in one anonymous shared mapping made before the workers fork (so no named segment exists
that could outlive the run), page-locked for the GPU when CUDA is present. Each lane's worker owns
`slots` of them. Per lane, a free pipe (main → worker) and a full pipe (worker → main) carry only slot
numbers and the lane's position after the batch; the tokens never leave the slot until the main process
copies them out (to the device, or into the tensors it yields).
"""

from __future__ import annotations

import contextlib
import mmap
import weakref
from collections import deque
from typing import Any

import numpy as np
import torch

from lmforge.loaders import procs
from lmforge.loaders.streaming import LaneSpec, StreamingLoader


def _ring_worker(spec: LaneSpec, lane: int, mem: mmap.mmap, width: int, mine: list[int], free: Any,
                 full: Any) -> None:
    ppid = procs.worker_setup()
    with procs.reporting(full.send):
        slots = np.frombuffer(mem, dtype=np.int64).reshape(-1, width)  # the mapping the parent made
        lane_obj = spec.make(lane)
        ready = deque(mine)
        while True:
            while not ready:
                if free.poll(procs.POLL_S):
                    slot = free.recv()
                    if slot is None:
                        return
                    ready.append(slot)
                elif not procs.parent_alive(ppid):
                    return
            slot = ready.popleft()
            if not lane_obj.fill(slots[slot]):
                full.send(("end",))
                break
            full.send(("batch", slot, lane_obj.state()))
    # ended (or failed): wait to be told to stop, so the main process reads every message first
    while procs.parent_alive(ppid):
        if free.poll(procs.POLL_S):
            try:
                if free.recv() is None:
                    return
            except EOFError:
                return


def _pin(buf: np.ndarray) -> bool:
    if not torch.cuda.is_available():
        return False
    return int(torch.cuda.cudart().cudaHostRegister(buf.ctypes.data, buf.nbytes, 0)) == 0


def _shutdown(workers: list[Any], free_pipes: list[Any], full_pipes: list[Any], mem: mmap.mmap,
              pinned_at: int) -> None:
    """Stop the workers, then free the slots (unpinned first). Holds no reference to the loader."""
    def request() -> None:
        for conn in free_pipes:
            with contextlib.suppress(OSError):  # that worker is gone already
                conn.send(None)

    procs.stop(workers, request)
    for conn in free_pipes + full_pipes:
        conn.close()
    if pinned_at:
        torch.cuda.synchronize()  # no copy may still be reading the slots
        torch.cuda.cudart().cudaHostUnregister(pinned_at)
    with contextlib.suppress(BufferError):  # a view is still alive (collection in progress): freed with it
        mem.close()


class RingLoader(StreamingLoader):
    """v2: pre-allocated shared slots, free/full slot pipes, one worker process per lane."""

    kind = "ring"

    def _start(self) -> None:
        ctx = procs.fork_context()
        n, width = self.lanes * self.slots, self.batch_tokens
        mem = mmap.mmap(-1, n * width * 8)  # anonymous and shared: the forked workers write into it
        self._slots = np.frombuffer(mem, dtype=np.int64).reshape(n, width)
        free = [ctx.Pipe(duplex=False) for _ in range(self.lanes)]  # (worker's end, our end)
        full = [ctx.Pipe(duplex=False) for _ in range(self.lanes)]  # (our end, worker's end)
        spec = self.lane_spec()
        live = [lane for lane in range(self.lanes) if not self._done[lane]]
        owned = {lane: list(range(lane * self.slots, (lane + 1) * self.slots)) for lane in live}
        # the workers get the mapping, not a view of it: a view held by a Process object would keep it open
        workers = procs.start(ctx, _ring_worker, [(spec, lane, mem, width, owned[lane], free[lane][0],
                                                   full[lane][1]) for lane in live])
        self._procs = dict(zip(live, workers, strict=True))
        for (theirs, _), (_, theirs_too) in zip(free, full, strict=True):
            theirs.close()  # only the workers hold these now, so a dead worker reads as EOF
            theirs_too.close()
        self._free = [ours for _, ours in free]
        self._full = [ours for ours, _ in full]
        pinned_at = self._slots.ctypes.data if self._pin and _pin(self._slots) else 0
        self._pending: tuple[int, torch.cuda.Event | None] | None = None
        self._finalizer = weakref.finalize(self, _shutdown, workers, self._free, self._full, mem, pinned_at)

    def _take(self, lane: int) -> tuple[np.ndarray, dict, bool] | None:
        if getattr(self, "_finalizer", None) is None or not self._finalizer.alive:
            self._start()
        self._release_pending()
        msg = self._receive(lane)
        if msg[0] == "end":
            return None
        _, slot, state = msg
        self._pending = (slot, None)
        return self._slots[slot], state, False

    def _receive(self, lane: int) -> tuple:
        conn, proc = self._full[lane], self._procs[lane]
        while not conn.poll(procs.POLL_S):
            if not proc.is_alive() and not conn.poll(0):
                err = procs.WorkerDied(proc, f"ring loader worker {lane}")
                self.close()
                raise err
        try:
            msg = conn.recv()
        except EOFError:  # the worker exited: reap it, for its exit code
            proc.join(procs.JOIN_S)
            err = procs.WorkerDied(proc, f"ring loader worker {lane}")
            self.close()
            raise err from None
        if msg[0] == "error":
            self.close()
            procs.raise_remote(msg[1], msg[2], f"ring loader worker {lane}")
        return msg

    def _release_pending(self) -> None:
        """Give the slot of the previous batch back to its worker once its copy is done."""
        if self._pending is None:
            return
        slot, event = self._pending
        if event is not None:
            event.synchronize()
        self._free[slot // self.slots].send(slot)
        self._pending = None

    def _emit(self, flat: np.ndarray, owned: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type != "cuda":
            out = super()._emit(flat, owned)  # copies: the slot goes back to its worker
            self._release_pending()
            return out
        b, t = self.batch_size, self.seq_len
        d = torch.from_numpy(flat).to(self.device, non_blocking=True)  # from page-locked memory: async
        event = torch.cuda.Event()
        event.record()
        self._pending = (self._pending[0], event)
        return d[:-1].view(b, t), d[1:].view(b, t).clone()

    def close(self) -> None:
        """Stop the workers and free the slots; iterating again restarts them from the saved state."""
        finalizer = getattr(self, "_finalizer", None)
        self._pending = None
        for name in ("_slots", "_procs", "_free", "_full"):
            self.__dict__.pop(name, None)
        if finalizer is not None:
            finalizer()
        super().close()
