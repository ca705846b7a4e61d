"""Training tokens kept on the device: windows are cut there, no token crosses the bus per batch.

The split goes to the device once, or, when it is larger than the allowed share of device memory, in
equal parts that take turns (see `windows.WindowPlan`): a part is loaded when the plan first needs it,
replacing the previous one. Window starts are computed on the host for BLOCK batches at a time and sent
over in one small copy, so the batches are exactly those of the host path (given one part).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from lmforge.loaders.windows import BLOCK, WindowPlan

COPY_TOKENS = 1 << 26  # host → device copies go in pieces this long, so no full host copy is made
SIGNED = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32}  # torch indexes signed ints fully


def device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the CPU "device" is RAM


def parts_needed(nbytes: int, device: torch.device, share: float) -> int:
    """How many equal parts keep each within `share` of the device's memory."""
    return max(1, math.ceil(nbytes / (share * device_memory(device))))


class ResidentTokens:
    def __init__(self, shards: list[np.ndarray], offsets: np.ndarray, plan: WindowPlan,
                 device: torch.device) -> None:
        self.shards, self.offsets, self.plan, self.device = shards, offsets, plan, device
        dtype = np.dtype(shards[0].dtype)
        self._view = SIGNED.get(dtype, dtype)
        self._mask = (1 << (8 * dtype.itemsize)) - 1 if dtype in SIGNED else 0
        self._cols = torch.arange(plan.t + 1, device=device)
        self._part = -1
        self._tokens: torch.Tensor | None = None
        self._block = -1
        self._pos: torch.Tensor | None = None
        self.loads = 0  # parts loaded so far (how often tokens crossed to the device)

    def _load(self, part: int) -> None:
        lo, hi = self.plan.bounds[part]
        self._tokens = None  # free the previous part before the next one takes its place
        out = torch.empty(hi - lo, dtype=getattr(torch, np.dtype(self._view).name), device=self.device)
        for i in range(len(self.shards)):
            a, b = max(lo, int(self.offsets[i])), min(hi, int(self.offsets[i + 1]))
            for s in range(a, b, COPY_TOKENS):
                e = min(b, s + COPY_TOKENS)
                piece = np.array(self.shards[i][s - self.offsets[i]:e - self.offsets[i]])  # writable: torch wants it
                out[s - lo:e - lo].copy_(torch.from_numpy(piece.view(self._view)))
        self._tokens, self._part = out, part
        self.loads += 1

    def _positions(self, k: int) -> torch.Tensor:
        """Window starts of batch k, relative to its part, from a per-block copy."""
        block = k // BLOCK
        if block != self._block:
            rows = [self.plan.starts(i) - self.plan.bounds[self.plan.part_of(i)][0]
                    for i in range(block * BLOCK, (block + 1) * BLOCK)]
            pos = torch.from_numpy(np.stack(rows))
            self._pos = (pos.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda"
                         else pos.to(self.device))
            self._block = block
        return self._pos[k % BLOCK]

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = self.plan.part_of(k)
        if part != self._part:
            self._load(part)
        idx = self._positions(k)[:, None] + self._cols  # (B, T + 1)
        w = self._tokens[idx].to(torch.int64)
        if self._mask:
            w &= self._mask  # the signed view back to token ids
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def free(self) -> None:
        self._tokens, self._pos, self._part, self._block = None, None, -1, -1
