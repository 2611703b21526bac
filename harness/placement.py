"""How many GPUs (and how much host memory) a job needs, and how a model is sharded over several GPUs.

GPUs per job come from the model's weight bytes (parameters × dtype size) plus headroom for activations,
the evaluation's logits and the method's predictors, against the memory of one GPU (`gpu_memory_gb`,
default 80 GiB, the smallest data-centre card the harness targets). A setting (`--gpus-per-job`)
overrides it for quality jobs; latency jobs stay on one GPU unless the model does not fit.

A sharded job places the decoder layers evenly over its devices (`layer_device_map`); the embeddings stay on the
first device, the final norm on the last (which modules these are is the model family's: `harness.families`; OPT's
tied LM head on the first device, an untied Llama head on the last, beside the final norm). Accelerate's hooks move activations between devices; the masked engine's
hooks compute masks on the device of each tensor, so head and neuron masks are the same as on one GPU.
"""
from __future__ import annotations

import math

from harness.families import family_of

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}
DEFAULT_GPU_MEMORY_GB = 80.0
# predictors, masks, activations and the logits of a 2048-token window, beyond the weights
HEADROOM = 1.25
FIXED_GB = 4.0


def parameter_count(config) -> int:
    """Parameters of a config, from its family's formula (a tied LM head counted once)."""
    return family_of(config).parameter_count(config)


def model_bytes(config, dtype: str) -> int:
    return parameter_count(config) * DTYPE_BYTES.get(dtype, 2)


def job_gpu_memory_gb(config, dtype: str) -> float:
    return model_bytes(config, dtype) * HEADROOM / 2**30 + FIXED_GB


def gpus_for(config, dtype: str, *, latency: bool = False, override: int | None = None,
             gpu_memory_gb: float | None = None) -> int:
    """GPUs one job needs; `override` wins for quality jobs, latency jobs take one GPU when the model fits."""
    need = math.ceil(job_gpu_memory_gb(config, dtype) / (gpu_memory_gb or DEFAULT_GPU_MEMORY_GB))
    need = max(1, need)
    if latency:
        return need  # one GPU unless the model does not fit on one
    return max(1, int(override)) if override else need


def layer_device_map(config, devices: list) -> tuple[dict, list[int]]:
    """device_map for the causal LM over `devices`: decoder layers split evenly (earlier devices get the
    remainder last); the modules around them where the model's family puts them (embeddings first, final norm
    last)."""
    layers, count = config.num_hidden_layers, len(devices)
    base, extra = divmod(layers, count)
    per_device = [base + (1 if index >= count - extra else 0) for index in range(count)]
    layer_devices = [device for device, n in zip(devices, per_device) for _ in range(n)]
    device_map = family_of(config).device_map(config, layer_devices, devices[0], devices[-1])
    return device_map, per_device


def sharding_record(per_device: list[int], devices: list) -> dict:
    return {"devices": [str(d) for d in devices], "layers_per_device": per_device,
            "first_layer_per_device": [sum(per_device[:i]) for i in range(len(per_device))]}
