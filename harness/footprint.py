"""What a run's fits will take (host memory, disk in the artefact cache, GPU memory), estimated from the
model's config before anything is built, and checked against what the machine has.

Each method names the artefacts its fit makes (`Method.footprint`), each with a `Need`; artefacts that
several jobs share (the traces, one criterion's scores, Deja Vu's neuron predictors at every sparsity)
carry the same label and count once. A run whose estimate exceeds the machine is refused before any work
(exit 2) with the setting to change, instead of running out of memory or disk halfway through a fit.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

GiB = 2**30
HEADROOM = 0.9  # the share of free memory or disk an estimate may take (allocator slack, other processes)


@dataclass(frozen=True)
class Need:
    """One artefact's cost: kept in host memory for the session, stored on disk, and GPU memory while built."""

    what: str
    host: int = 0
    disk: int = 0
    gpu: int = 0
    settings: str = "calib_budget_gb"  # what lowers it, for the error message


def predictor_training_gpu(params: int, batch_bytes: int, data_bytes: int) -> int:
    """AdamW in float32: weights, gradients and two moments (16 bytes a parameter), a batch's activations
    (forward and backward) and the training data moved to the device once."""
    return 16 * params + 4 * batch_bytes + data_bytes


def run_needs(jobs, model_config, run_config) -> dict[tuple, Need]:
    """The distinct artefacts the jobs' fits make, by label."""
    from methods import MethodSpec, get_method

    needs: dict[tuple, Need] = {}
    for job in jobs:
        spec = MethodSpec.parse(job.method)
        method = get_method(spec, run_config.method_settings.get(spec.name, {}))
        allocation = method.adjust(job.allocation(run_config))
        for label, need in method.footprint(model_config, run_config, allocation, job.seed).items():
            needs.setdefault(label, need)
    return needs


def _free_disk(path: Path) -> int:
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _free_host() -> int:
    import psutil

    return psutil.virtual_memory().available


def _gpu_total(device: str) -> int | None:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    index = torch.device(device).index or 0
    return torch.cuda.get_device_properties(index).total_memory


def _list(needs, attr) -> str:
    parts = [f"{n.what} {getattr(n, attr) / GiB:.1f}" for n in needs if getattr(n, attr)]
    return ", ".join(parts)


def check(needs: dict[tuple, Need], *, model_config, run_config, device: str, dtype: str, cache_root: Path,
          free_host=None, free_disk=None, gpu_total=None) -> dict:
    """Raise HarnessError when the estimate exceeds the machine; return the estimate (GiB) otherwise.
    free_host / free_disk / gpu_total override what is measured (tests)."""
    items = list(needs.values())
    if not items:
        return {}
    from harness.placement import model_bytes

    weights = model_bytes(model_config, dtype)
    host = sum(n.host for n in items)
    disk = sum(n.disk for n in items)
    gpu = max(n.gpu for n in items)
    gpu_total = _gpu_total(device) if gpu_total is None else gpu_total
    free_host = _free_host() if free_host is None else free_host
    free_disk = _free_disk(cache_root) if free_disk is None else free_disk
    budget = run_config.calib_budget_gb
    settings = sorted({s for n in items for s in n.settings.split(",")})
    change = " or ".join(f"`{s}`" for s in settings)
    on_gpu = gpu_total is not None
    host_total = host + (0 if on_gpu else gpu + weights)
    if host_total > HEADROOM * free_host:
        raise HarnessError(
            f"the fits of this run would keep about {host_total / GiB:.1f} GiB in host memory "
            f"({_list(items, 'host')}{'' if on_gpu else f', model {weights / GiB:.1f}, training {gpu / GiB:.1f}'} GiB) "
            f"but {free_host / GiB:.1f} GiB is available; lower {change} (calib_budget_gb is {budget})")
    if disk > HEADROOM * free_disk:
        raise HarnessError(
            f"the fits of this run would store about {disk / GiB:.1f} GiB in the artefact cache {cache_root} "
            f"({_list(items, 'disk')} GiB) but {free_disk / GiB:.1f} GiB is free there; lower {change} "
            f"(calib_budget_gb is {budget}) or point --cache-dir at a larger disk")
    if on_gpu and weights + gpu > HEADROOM * gpu_total:
        worst = max(items, key=lambda n: n.gpu)
        raise HarnessError(
            f"fitting {worst.what} would need about {(weights + gpu) / GiB:.1f} GiB of GPU memory (model "
            f"{weights / GiB:.1f} GiB + {gpu / GiB:.1f} GiB) but {device} has {gpu_total / GiB:.1f} GiB; lower "
            f"{worst.settings.replace(',', ' or ')} (calib_budget_gb is {budget})")
    return {"host_gb": host / GiB, "disk_gb": disk / GiB, "gpu_gb": (weights + gpu) / GiB if on_gpu else None}


def check_run(config, jobs, model_spec, cache_dir=None) -> dict:
    """The run's fit estimate checked against this machine (before any model is built or folder created)."""
    from harness.artefacts import cache_root
    from harness.models import dtype_name, resolve_device, resolve_dtype

    device = resolve_device(config.device)
    model_config = model_spec.config()
    return check(run_needs(jobs, model_config, config), model_config=model_config, run_config=config, device=device,
                 dtype=dtype_name(resolve_dtype(config.dtype, device)), cache_root=cache_root(cache_dir))
