"""Where the time of one decode step goes, kernel by kernel (torch.profiler), for a method's mask source.

    python3 -m kernels.profile_step --model opt-13b --layers 4 --methods static,timewise,dejavu,shadow

Builds a random-weight model with the first `--layers` decoder layers of `--model`'s shape, the method's source
with seeded untrained predictors (as kernels.latency_bench does), runs a prompt, then profiles `--steps` decode
steps without the CUDA graph and prints the CUDA time per kernel name (top `--top`) and per step. Without the
graph the launch gaps are the host's, so read the kernel times, not the wall time.
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-13b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--methods", default="static,timewise,dejavu,shadow")
    parser.add_argument("--heads", type=float, default=0.5)
    parser.add_argument("--neurons", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from harness.engine import Allocation
    from kernels import latency_bench as lb
    from kernels.bench import build_model
    from kernels.decode import SparseDecoder
    from kernels.sources import source_for

    model = build_model(False, layers=args.layers, name=args.model)
    c = model.config
    prompt = torch.randint(0, c.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0)).cuda()
    layers = None
    for method in args.methods.split(","):
        if method == "static":
            policy, allocation = lb.static_policy(model), Allocation(args.heads, args.neurons)
        elif method == "shadow":
            policy, allocation = lb.predictors(method, model), Allocation(args.heads, args.neurons, dense_layers=(0,))
        elif method == "timewise":
            policy, allocation = lb.predictors(method, model), Allocation(args.heads, 0.0)
        else:
            policy, allocation = lb.predictors(method, model), Allocation(args.heads, args.neurons)
        engine = SparseDecoder(model, source_for(policy, allocation, model), max_len=160, kv="recompute",
                               cuda_graph=False, layers=layers)
        layers = engine.layers
        logits = engine.prefill(prompt)
        for _ in range(3):  # autotune, warm caches
            logits = engine.step(logits.argmax(-1))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                logits = engine.step(logits.argmax(-1))
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.self_device_time_total for e in events) / args.steps
        print(f"\n== {method} @ h{args.heads}/n{args.neurons}, {args.model} shape, {c.num_hidden_layers} layers: "
              f"{total:.1f} us of kernels per step ({total / c.num_hidden_layers:.1f} per layer)")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
            print(f"  {e.self_device_time_total / args.steps:9.1f} us/step  {e.count // args.steps:4d}x  {e.key[:90]}")
        del engine


if __name__ == "__main__":
    main()
