"""Where a training step's time goes: torch.profiler over a few steps, summarised as the wall time per
step, the time the device was busy (its share: a low one means the step waits on the host) and the
kernels launched per step. Used by the training loop (train.profile_steps, StepProfiler) and by
tools/benchmark.py --profile.
"""
import logging
import os
import time
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from .atomic import write_text_atomic

log = logging.getLogger("rlrr")


def synchronizer(device: torch.device):
    """What waits for ``device``'s queued work (nothing to wait for on the CPU)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def start_profiler(device: torch.device) -> profile:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    prof.start()
    return prof


def summary(prof: profile, steps: int, wall_s: float, device: torch.device) -> dict:
    """wall_ms (per step) and, on a GPU, device_busy_ms (kernel time per step), device_busy_share and
    kernels (per step)."""
    out = {"steps": steps, "wall_ms": round(1e3 * wall_s / steps, 3)}
    if device.type == "cuda":
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
        out.update(device_busy_ms=round(busy_ms, 3), device_busy_share=round(busy_ms / out["wall_ms"], 3),
                   kernels=round(sum(e.count for e in kernels) / steps, 1))
    return out


def describe(s: dict) -> str:
    line = f"{s['steps']} steps profiled: {s['wall_ms']:.2f} ms a step"
    if "device_busy_ms" in s:
        line += (f", the device busy {s['device_busy_ms']:.2f} ms ({100 * s['device_busy_share']:.0f}%), "
                 f"{s['kernels']:.0f} kernels a step")
    return line


def tables(prof: profile, device: torch.device, rows: int = 30) -> str:
    """The ops that took the host's time and, on a GPU, the kernels that took the device's."""
    events = prof.key_averages()
    out = "host (self CPU time):\n" + events.table(sort_by="self_cpu_time_total", row_limit=rows)
    if device.type == "cuda":
        out += "\ndevice (self CUDA time):\n" + events.table(sort_by="self_device_time_total", row_limit=rows)
    return out


class StepProfiler:
    """train.profile_steps: after the warm-up, profile that many optimizer steps on rank 0 and write
    <run>/profile/profile.txt (tables), trace.json.gz (chrome://tracing, ui.perfetto.dev) and summary
    (the log line and results.json's "profile"). Profiled steps run slower: the loop books them apart
    from img/s, as it does the warm-up."""

    def __init__(self, steps: int, out_dir: str, device: torch.device, enabled: bool):
        self.steps, self.out_dir, self.device = steps if enabled else 0, out_dir, device
        self.prof, self.counted, self.started, self.seen = None, 0, 0.0, 0
        self.summary: Optional[dict] = None
        self._sync = synchronizer(device)

    def after_step(self, seen: int) -> Optional[tuple[float, int]]:
        """Call after each timed optimizer step with the samples this rank has seen in the epoch: opens
        the window at the first call, closes it after ``steps`` more (waiting for the device). Returns
        the window's (seconds, samples) when it closed."""
        if not self.steps or self.summary is not None:
            return None
        if self.prof is None:
            self._sync()
            self.prof, self.started, self.seen, self.counted = start_profiler(self.device), time.perf_counter(), seen, 0
            return None
        self.counted += 1
        return self.stop(seen) if self.counted == self.steps else None

    def stop(self, seen: int) -> Optional[tuple[float, int]]:
        """Close an open window, also early (at an epoch's end: evaluation is not a training step):
        its (seconds, samples). A window without a step reports nothing and opens again later."""
        if self.prof is None or self.summary is not None:
            return None
        self._sync()
        window = time.perf_counter() - self.started, seen - self.seen
        self.prof.stop()
        if not self.counted:
            self.prof = None
            return window
        self.summary = summary(self.prof, self.counted, window[0], self.device)
        os.makedirs(self.out_dir, exist_ok=True)
        write_text_atomic(os.path.join(self.out_dir, "profile.txt"),
                          describe(self.summary) + "\n\n" + tables(self.prof, self.device))
        self.prof.export_chrome_trace(os.path.join(self.out_dir, "trace.json.gz"))
        log.info(f"{describe(self.summary)}; {self.out_dir}")
        return window
