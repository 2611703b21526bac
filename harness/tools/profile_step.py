"""Where the time of one decode step goes, kernel by kernel (torch.profiler), for a method's mask source.

    python3 -m harness.tools.profile_step --model opt-13b --layers 4 --methods dense,static,timewise,dejavu,shadow \
        [--pdl 0,1,prefetch] [--prompt 128]

Builds a random-weight model with the first `--layers` decoder layers of `--model`'s shape, the method's source
with seeded untrained predictors (as harness.tools.latency_bench does), runs a prompt, captures the step in a CUDA
graph and profiles `--steps` replays. Prints, per method: the graph replay time per step (CUDA events), the
CUDA time per kernel name (top `--top`), and the timeline of one layer (second layer of the first profiled
step): each kernel's duration and its start relative to the previous kernel's end (negative = overlap, e.g.
programmatic dependent launch). `--no-graph` profiles eager steps instead (launch gaps are then the host's).
`--pdl` compares PDL modes on one engine; `--prompt` sets the prompt length (the cache holds 64 positions
more).
"""
from __future__ import annotations

import argparse

import torch

from kernels.profiling import kernel_events  # noqa: F401 - also this module's name for it


def snapshot(engine):
    """What a step changes besides the cache: the position (device and host), the greedy token and Deja Vu's
    have-flags."""
    return engine.pos.clone(), engine.length, engine.token.clone(), [h.clone() for h in getattr(engine, "have", [])]


def restore(engine, state):
    pos, length, token, have = state
    engine.pos.copy_(pos)
    engine.length = length
    engine.token.copy_(token)
    for now, saved in zip(getattr(engine, "have", []), have):
        now.copy_(saved)


def replay_ms(engine, state, n=20, repeats=5) -> float:
    """Median over `repeats` of the mean ms of n back-to-back graph replays from the same state (the step
    without the host)."""
    times = []
    for _ in range(repeats):
        restore(engine, state)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            engine.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    restore(engine, state)
    return sorted(times)[len(times) // 2]


def layer_timeline(events, markers=("_layer_norm_kernel", "_rms_norm_kernel")):
    """The kernels from the 3rd to the 5th norm launch (two norms per layer, OPT's LayerNorm or Llama's RMSNorm:
    the second layer)."""
    at = [i for i, e in enumerate(events) if e[0].startswith(markers)]
    if len(at) < 5:
        return events[:16]
    return events[at[2]:at[4]]


def report(prof, title, replay, num_layers, args):
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / args.steps
    print(f"\n== {title}: graph replay {replay * 1e3:.1f} us/step (median); {total:.1f} us of kernels per step "
          f"({total / num_layers:.1f} per layer)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"  {e.self_device_time_total / args.steps:9.1f} us/step  {e.count // args.steps:4d}x  {e.key[:90]}")
    timeline = layer_timeline(kernel_events(prof))
    if not timeline:
        print("  (the profiler saw no kernels)")
        return
    print("  one layer:   start-after-prev-end   duration   kernel")
    prev_end = timeline[0][1]
    for name, start, dur in timeline:
        print(f"  {start - prev_end:+24.1f} us {dur:8.1f} us   {name[:70]}")
        prev_end = start + dur
    span = timeline[-1][1] + timeline[-1][2] - timeline[0][1]
    print(f"  layer span {span:.1f} us, kernels {sum(d for _, _, d in timeline):.1f} us")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-13b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--methods", default="dense,static,timewise,dejavu,shadow")
    parser.add_argument("--heads", type=float, default=0.5)
    parser.add_argument("--neurons", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--no-graph", action="store_true")
    parser.add_argument("--pdl", default=None, help="comma-separated KERNELS_PDL modes to compare, e.g. 0,1,prefetch "
                        "(default: the environment's)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--kv", default=None, help="all or recompute for the sparse methods (default recompute)")
    args = parser.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from harness.engine import Allocation
    from kernels import gemv
    from harness.tools import latency_bench as lb
    from kernels.bench.gpu import build_model
    from kernels.decode import DenseMasks, SparseDecoder
    from harness.decoding import source_for

    from harness.families import family_of
    from harness.models import ModelSpec, load_model

    spec = ModelSpec(args.model, "random")
    llama = family_of(spec.config()).name == "llama"
    if llama:  # the Llama-family engine (RMSNorm, RoPE, GQA, SwiGLU)
        from kernels.decode_llama import LlamaSparseDecoder as Decoder

        model = load_model(spec, device="cuda", dtype=torch.float16, layers=args.layers)
    else:
        Decoder = SparseDecoder
        model = build_model(False, layers=args.layers, name=args.model)
    c = model.config
    prompt = torch.randint(0, c.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0)).cuda()
    print(f"{args.model} shape, {c.num_hidden_layers} layers, {'eager steps' if args.no_graph else 'CUDA graph replays'}")
    layers = None
    for method in args.methods.split(","):
        if method == "dense":
            source = DenseMasks(c.num_hidden_layers)
        elif method == "static":
            source = source_for(method, lb.static_policy(model), Allocation(args.heads, args.neurons), model)
        elif method == "shadow":
            source = source_for(method, lb.predictors(method, model), Allocation(args.heads, args.neurons, dense_layers=(0,)),
                                model)
        elif method == "timewise":
            source = source_for(method, lb.predictors(method, model), Allocation(args.heads, 0.0), model)
        else:
            source = source_for(method, lb.predictors(method, model), Allocation(args.heads, args.neurons), model)
        kv = "all" if method == "dense" else (args.kv or "recompute")
        options = dict(backend="triton", device="cuda", dtype=torch.float16) if llama else dict(kv=kv)
        engine = Decoder(model, source, max_len=args.prompt + 64, cuda_graph=not args.no_graph, layers=layers,
                         **options)
        layers = engine.layers
        engine.prefill(prompt)
        state = snapshot(engine)
        for mode in (args.pdl.split(",") if args.pdl else [gemv.PDL_MODE]):
            gemv.set_pdl(mode)
            engine.graph = None  # captured again with this mode's launches
            restore(engine, state)
            for _ in range(3):  # autotune, capture, warm caches
                engine.step(engine.next_token)
            torch.cuda.synchronize()
            replay = replay_ms(engine, state) if engine.graph is not None else float("nan")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    engine.step(engine.next_token)
                torch.cuda.synchronize()
            restore(engine, state)
            report(prof, f"{method} @ h{args.heads}/n{args.neurons}, KERNELS_PDL={gemv.PDL_MODE}, prompt {args.prompt}",
                   replay, c.num_hidden_layers, args)
        del engine


if __name__ == "__main__":
    main()
