"""Reading the PyTorch profiler: the CUDA kernels it saw (shared by kernels.bench.gpu and harness.tools.profile_step)."""
from __future__ import annotations

import torch


def kernel_events(prof):
    """(name, start µs, duration µs) of every CUDA kernel the profiler saw, in start order."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0:
            out.append((e.name(), e.start_ns() / 1e3, e.duration_ns() / 1e3))
    return sorted(out, key=lambda e: e[1])
