"""Latency: wall-clock decode of one request per measurement, for the sparse decode engine with each method's
predictor inside the step (its `Method.decode_source`, through harness/decoding.py), and for dense baselines.

Task `decode` (masked=False: it builds its own engine from the job's method, allocation and fitted artefact,
`session.job`). A request = prefill of `prompt` tokens + `new_tokens` generated greedily (the first from the
prefill's logits, then new_tokens−1 decode steps), batch `batch`. `warmup` requests first (graph capture,
autotuning, torch.compile), then `repeats` measured ones. Timing: CUDA events around the prefill and around
every step (its greedy argmax is computed inside it) on a GPU, host timers (perf_counter) on a CPU; the request
total is a host timer with a synchronize at its end. Records (one per metric):

  prefill_ms         median prefill time
  token_ms           median per-token time over all measured steps; token_ms_p90, token_ms_p99
  request_ms         median total time of a request; tokens_per_s = batch · new_tokens / request time
  peak_mem_gb        allocator peak during the measurement on a GPU (all resident tensors: the Hugging Face
                     model stays loaded beside our engine's re-laid-out weights); process max RSS on a CPU
  floor_ms           weight-streaming floor: bytes one step must read (model weights the kernels read, plus
                     the predictor's weights) / measured copy bandwidth (bytes read + written by a
                     device-to-device copy); floor_model_ms leaves the predictor out
  predictor_share    (sparse methods) (t − t_ref) / t, clamped to [0, 1], where t_ref is the per-token time of
                     the same engine with a static source of the same per-layer counts (no predictor);
                     predictor_ms = t − t_ref unclamped

Engines (record field `engine`; the row label is `<method> · <engine>` for the dense baselines):
  ours       kernels.decode.SparseDecoder, static KV cache, CUDA graph (DenseMasks for `dense`)
  hf-eager   Hugging Face `generate`, dynamic cache, eager
  hf-static  Hugging Face `generate` with its static cache (compiled by generate on CUDA: torch.compile,
             mode reduce-overhead; not compiled on a CPU, said in the record)
  deepspeed  DeepSpeed-Inference with kernel injection (if it imports and injects; else an error record)

Settings (`method_settings: {latency: {...}}` in a suite, all optional): batch, prompt, new_tokens, warmup,
repeats, kv (recompute|all, sparse methods; dense uses all), cuda_graph, backend (triton|torch), engines (for
`dense`), reference (measure the static reference for predictor_share), copy_mb, seed.
"""
from __future__ import annotations

import resource
import statistics
import time
from types import SimpleNamespace

import torch

from harness.errors import HarnessError

DEFAULTS = dict(batch=1, prompt=128, new_tokens=128, warmup=1, repeats=3, kv="auto", cuda_graph=True,
                backend=None, engines=["ours", "hf-eager", "hf-static"], reference=True, copy_mb=None, seed=0,
                combine="mean", lookahead=True, change_steps=32)
ENGINES = ("ours", "hf-eager", "hf-static", "deepspeed")
KV_SETTINGS = ("auto", "all", "recompute")


def settings_of(config) -> dict:
    given = dict((getattr(config, "method_settings", None) or {}).get("latency", {}) or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise HarnessError(f"unknown latency setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(DEFAULTS))}")
    settings = {**DEFAULTS, **given}
    for engine in settings["engines"]:
        if engine not in ENGINES:
            raise HarnessError(f"unknown latency engine {engine!r}; valid: {', '.join(ENGINES)}")
    if settings["new_tokens"] < 2 or settings["prompt"] < 1 or settings["repeats"] < 1:
        raise HarnessError("latency needs prompt >= 1, new_tokens >= 2 and repeats >= 1")
    if settings["kv"] not in KV_SETTINGS:
        raise HarnessError(f"unknown latency kv {settings['kv']!r}; valid: {', '.join(KV_SETTINGS)}")
    from kernels.topk import COMBINE

    if settings["combine"] not in COMBINE:
        raise HarnessError(f"unknown latency combine {settings['combine']!r}; valid: {', '.join(COMBINE)}")
    batches = settings["batch"] if isinstance(settings["batch"], (list, tuple)) else [settings["batch"]]
    if not batches or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batches):
        raise HarnessError(f"latency batch must be a positive integer or a list of them, not {settings['batch']!r}")
    settings["batches"] = [int(b) for b in batches]
    return settings


# ------------------------------------------------------------------------------------------------------------
# clocks and statistics
# ------------------------------------------------------------------------------------------------------------
class Clock:
    """Marks on the device's timeline: CUDA events on a GPU (no sync until read), perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    @property
    def name(self) -> str:
        return "cuda-events" if self.cuda else "host perf_counter"


def quantile(values, q: float) -> float:
    """Linear-interpolated quantile (numpy's default)."""
    values = sorted(values)
    if not values:
        return float("nan")
    pos = (len(values) - 1) * q
    low = int(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


def summarise(prefill: list, steps: list, requests: list, batch: int, new_tokens: int) -> dict:
    return {"prefill_ms": statistics.median(prefill), "token_ms": statistics.median(steps),
            "token_ms_p90": quantile(steps, 0.9), "token_ms_p99": quantile(steps, 0.99),
            "request_ms": statistics.median(requests),
            "tokens_per_s": batch * new_tokens / (statistics.median(requests) / 1e3),
            "steps_measured": len(steps), "requests_measured": len(requests)}


class PeakMemory:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.gb = torch.cuda.max_memory_allocated() / 1e9
            self.note = "allocator peak (all resident tensors)"
        else:
            self.gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
            self.note = "process max RSS"


def copy_bandwidth(device, mb: int | None = None) -> float:
    """Bytes/s of a device-to-device copy of `mb` MB, counting bytes read + written (median of 10 after warm-up)."""
    cuda = torch.device(device).type == "cuda"
    n = int((mb or (1024 if cuda else 64)) * 1e6) // 2
    x = torch.ones(n, device=device, dtype=torch.float16)
    y = torch.empty_like(x)
    clock, times = Clock(device), []
    for i in range(13):
        a = clock.mark()
        y.copy_(x)
        b = clock.mark()
        clock.sync()
        if i >= 3:
            times.append(clock.ms(a, b))
    del x, y
    return 2 * n * 2 / (statistics.median(times) * 1e-3)


def floor_bytes(config, dtype, heads_kept, neurons_kept, kv: str) -> int:
    """kernels.decode.SparseDecoder.weight_bytes without building an engine (for the Hugging Face baselines)."""
    from kernels.decode import SparseDecoder

    d, H = config.hidden_size, config.num_attention_heads
    proj = config.word_embed_proj_dim
    fake = SimpleNamespace(
        dtype=dtype, hidden=d, head_dim=d // H, num_heads=H, kv=kv, heads_kept=heads_kept, neurons_kept=neurons_kept,
        lm_head=SimpleNamespace(numel=lambda: config.vocab_size * proj),
        project_out=SimpleNamespace(numel=lambda: d * proj) if proj != d else None)
    return SparseDecoder.weight_bytes(fake)


# ------------------------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------------------------
def prompt_ids(config, batch: int, length: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (batch, length), generator=g).to(device)


@torch.no_grad()
def measure_ours(engine, prompt, settings, device) -> dict:
    """Requests on a SparseDecoder (kernels.decode): prefill, then one step per token (the greedy argmax of
    each step's logits is computed inside the step: `engine.next_token`)."""
    clock, new = Clock(device), settings["new_tokens"]
    prefill, steps, requests = [], [], []
    with PeakMemory(device) as memory:
        for r in range(settings["warmup"] + settings["repeats"]):
            clock.sync()
            begin = time.perf_counter()
            a = clock.mark()
            engine.prefill(prompt)
            b = clock.mark()
            marks = [b]
            for _ in range(new - 1):
                engine.step(engine.next_token)
                marks.append(clock.mark())
            clock.sync()
            total = (time.perf_counter() - begin) * 1e3
            if r >= settings["warmup"]:
                prefill.append(clock.ms(a, b))
                steps += [clock.ms(x, y) for x, y in zip(marks, marks[1:])]
                requests.append(total)
    stats = summarise(prefill, steps, requests, prompt.shape[0], new)
    stats.update(peak_mem_gb=memory.gb, peak_mem_note=memory.note, timer=clock.name)
    return stats


def _step_clock(clock):
    """A logits processor that marks the timeline once per generated token (after each forward)."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.marks = []

        def __call__(self, input_ids, scores):
            self.marks.append(clock.mark())
            return scores

    return StepClock()


@torch.no_grad()
def measure_hf(model, prompt, settings, device, static: bool) -> dict:
    """Hugging Face `generate` (greedy, exactly new_tokens): eager dynamic cache, or its static cache (which
    generate compiles on CUDA)."""
    from transformers import LogitsProcessorList

    clock, new = Clock(device), settings["new_tokens"]
    prefill, steps, requests = [], [], []
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=model.config.pad_token_id)
    if static:
        kwargs["cache_implementation"] = "static"
    attention_mask = torch.ones_like(prompt)
    with PeakMemory(device) as memory:
        for r in range(settings["warmup"] + settings["repeats"]):
            marker = _step_clock(clock)
            clock.sync()
            begin = time.perf_counter()
            a = clock.mark()
            out = model.generate(prompt, attention_mask=attention_mask, logits_processor=LogitsProcessorList([marker]),
                                 **kwargs)
            clock.sync()
            total = (time.perf_counter() - begin) * 1e3
            if out.shape[1] - prompt.shape[1] != new:
                raise RuntimeError(f"generate made {out.shape[1] - prompt.shape[1]} tokens, not {new}")
            if r >= settings["warmup"]:
                prefill.append(clock.ms(a, marker.marks[0]))
                steps += [clock.ms(x, y) for x, y in zip(marker.marks, marker.marks[1:])]
                requests.append(total)
    stats = summarise(prefill, steps, requests, prompt.shape[0], new)
    compiled = static and torch.device(device).type == "cuda"
    stats.update(peak_mem_gb=memory.gb, peak_mem_note=memory.note, timer=clock.name,
                 compiled=compiled, cache="static" if static else "dynamic")
    return stats


def deepspeed_model(model):
    """DeepSpeed-Inference with kernel injection (fp16, one GPU); raises with DeepSpeed's own error."""
    import deepspeed

    engine = deepspeed.init_inference(model, dtype=model.dtype, replace_with_kernel_inject=True,
                                      tensor_parallel={"tp_size": 1})
    return engine.module


# ------------------------------------------------------------------------------------------------------------
# the task
# ------------------------------------------------------------------------------------------------------------
def shared_layers(session, model, device, dtype):
    """Our engine's re-laid-out weights, made once per session and shared by every job's engine."""
    from kernels.decode import DenseMasks
    from kernels.decode_llama import sparse_decoder

    def build():
        return sparse_decoder(model, DenseMasks(model.config.num_hidden_layers), max_len=2, cuda_graph=False,
                              device=device, dtype=dtype).layers
    return session.memo("latency:decode-layers", build)


def _dense_bytes(session, model, settings) -> int:
    """Bytes one dense step of our engine reads (the dense floor's numerator, for every dense baseline)."""
    from kernels.decode import DenseMasks

    engine = _engine(model, DenseMasks(model.config.num_hidden_layers), {**settings, "cuda_graph": False, "prompt": 1,
                                                                        "new_tokens": 1}, session, "all")
    return engine.weight_bytes()


def _engine(model, source, settings, session, kv):
    from kernels.decode_llama import sparse_decoder

    device, dtype = session.device, session.dtype
    return sparse_decoder(model, source, max_len=settings["prompt"] + settings["new_tokens"], batch=settings["batch"],
                         kv=kv, backend=settings["backend"], cuda_graph=settings["cuda_graph"], device=device,
                         dtype=dtype, layers=shared_layers(session, model, device, dtype))


def _achieved(engine) -> dict:
    H, F = engine.num_heads, engine.ffn_dim
    heads = [1 - k / H for k in engine.heads_kept]
    neurons = [1 - k / F for k in engine.neurons_kept]
    return {"achieved_heads": sum(heads) / len(heads), "achieved_neurons": sum(neurons) / len(neurons),
            "achieved_heads_per_layer": heads, "achieved_neurons_per_layer": neurons}


METRICS = ("prefill_ms", "token_ms", "token_ms_p90", "token_ms_p99", "request_ms", "tokens_per_s", "peak_mem_gb",
           "floor_ms")


def to_records(stats: dict, common: dict, extra_metrics=()) -> list[dict]:
    shared = {k: v for k, v in stats.items() if k not in METRICS and k not in extra_metrics}
    out = []
    for name in METRICS + tuple(extra_metrics):
        if name in stats:
            out.append({"metric": name, "value": stats[name], "stderr": None, "n": stats.get("steps_measured"),
                        **common, **shared})
    return out


def decode_task(session, job, config, progress):
    records = measure_job(session, job, config, progress)
    try:  # a readable table beside the records, updated after every job
        from harness.models import dtype_name

        context = session.job
        base = {"model": session.model_spec.label, "weights": config.weights, "dtype": dtype_name(session.dtype),
                "device": session.device, "method": context.method.name, "method_label": context.method.label,
                "sparsity": job.sparsity, "task": job.task}
        preview = [{**base, **r} for r in records]
        if preview:
            preview[0].setdefault("achieved_heads", records[0].get("achieved_heads"))
        write_latency_table(getattr(session, "run_dir", None), preview)
    except Exception as exc:  # noqa: BLE001 - the table is a convenience; the records are what counts
        session.log(f"latency.md not written: {exc}")
    return records


def measure_job(session, job, config, progress):
    settings = settings_of(config)
    records = []
    for batch in settings["batches"]:
        records += _measure_batch(session, config, progress, {**settings, "batch": batch})
    return records


def _source(context, model, settings):
    """The method's mask source with the latency settings that concern it (a fresh one per engine)."""
    from harness.decoding import source_for

    source = source_for(context.method, context.policy, context.allocation, model)
    if hasattr(source, "lookahead"):
        source.combine, source.lookahead = settings["combine"], bool(settings["lookahead"])
    return source


def _live(used) -> torch.Tensor:
    from kernels.decode import Counted

    if isinstance(used, Counted):
        return used.idx.reshape(-1)[:int(used.count.reshape(-1)[0])]
    return used.reshape(-1)


@torch.no_grad()
def head_change_rate(engine, prompt, steps: int) -> float | None:
    """How often a token's kept head set differs from the previous token's, over the sparse layers (layers
    keeping every head left out) of `steps` decode steps after a prefill: Deja Vu's K/V recompute runs at this
    rate (a kept head without K/V for earlier tokens recomputes them). None when no layer skips heads."""
    H = engine.num_heads
    sparse = [l for l, k in enumerate(engine.heads_kept) if k < H]
    if not sparse:
        return None
    engine.prefill(prompt)
    previous, changed, total = None, 0, 0
    for _ in range(min(steps, engine.max_len - prompt.shape[1] - 1)):
        engine.step(engine.next_token)
        now = [frozenset(_live(engine.heads_used[l]).tolist()) for l in sparse]
        if previous is not None:
            changed += sum(a != b for a, b in zip(previous, now))
            total += len(now)
        previous = now
    return changed / total if total else None


def _measure_batch(session, config, progress, settings):
    context = session.job
    model = session.model
    device = session.device
    model_config = model.config
    L = model_config.num_hidden_layers
    bw = session.memo("latency:copy-bandwidth", lambda: copy_bandwidth(device, settings["copy_mb"]))
    prompt = prompt_ids(model_config, settings["batch"], settings["prompt"], settings["seed"], device)
    common = {"batch": settings["batch"], "prompt_len": settings["prompt"], "new_tokens": settings["new_tokens"],
              "warmup": settings["warmup"], "repeats": settings["repeats"], "copy_bandwidth_gbps": bw / 1e9,
              "weights_note": "random weights: latency only" if config.weights == "random" else config.weights}
    method = context.method
    if method.name == "dense":
        engines = list(settings["engines"])
        if progress is not None:
            progress.total(len(engines) * len(settings["batches"]))
        records = []
        dense_bytes = _dense_bytes(session, model, settings)
        for engine_name in engines:
            label = {"method_label": f"{method.label} · {engine_name}", "engine": engine_name}
            try:
                stats = dense_engine(engine_name, model, prompt, settings, session)
                stats.update(floor_ms=dense_bytes / bw * 1e3, floor_model_ms=dense_bytes / bw * 1e3,
                             weight_bytes=dense_bytes, predictor_bytes=0)
                records += to_records(stats, {**common, **label})
            except Exception as exc:  # noqa: BLE001 - one baseline failing (e.g. DeepSpeed) must not hide the others
                records.append({"metric": "token_ms", "value": None, "stderr": None, "n": 0, **common, **label,
                                "error": f"{type(exc).__name__}: {exc}"[:2000]})
            if progress is not None:
                progress.advance()
        records[0].update(achieved_heads=0.0, achieved_neurons=0.0, achieved_heads_per_layer=[0.0] * L,
                          achieved_neurons_per_layer=[0.0] * L)
        return records

    from kernels.sources import reference_source

    from harness.families import family_of

    modes = ("all", "recompute") if settings["kv"] == "auto" else (settings["kv"],)
    if family_of(model).name != "opt":  # K/V heads shared by a group of query heads: K/V of every token (kv=all)
        modes = ("all",)
    by_kv, change, achieved = {}, None, None
    for kv in modes:  # the same masks either way: the K/V policy changes only how K/V are had
        source = _source(context, model, settings)
        engine = _engine(model, source, settings, session, kv)
        stats = measure_ours(engine, prompt, settings, device)
        if change is None and not getattr(source, "static", False):
            change = head_change_rate(engine, prompt, settings["change_steps"])
        model_bytes = engine.weight_bytes()
        pred_bytes = source.predictor_bytes() if hasattr(source, "predictor_bytes") else 0
        stats.update(engine="ours", kv=kv, cuda_graph=bool(engine.use_graph), backend=engine.backend,
                     weight_bytes=model_bytes, predictor_bytes=pred_bytes,
                     floor_ms=(model_bytes + pred_bytes) / bw * 1e3, floor_model_ms=model_bytes / bw * 1e3,
                     heads_kept=engine.heads_kept, neurons_kept=engine.neurons_kept,
                     combine=getattr(source, "combine", None), lookahead=getattr(source, "lookahead", None))
        achieved = _achieved(engine)
        by_kv[kv] = stats
        del engine
    kv = min(by_kv, key=lambda k: by_kv[k]["token_ms"])
    stats = by_kv[kv]
    stats.update(kv_setting=settings["kv"], kv_chosen="faster of " + "/".join(modes) if len(modes) > 1 else "set",
                 token_ms_by_kv={k: v["token_ms"] for k, v in by_kv.items()},
                 head_change_rate=0.0 if change is None and getattr(source, "static", False) else change)
    extra = ()
    if settings["reference"] and not getattr(source, "static", False):
        reference = _engine(model, reference_source(source, L), settings, session, kv)
        ref = measure_ours(reference, prompt, settings, device)
        del reference
        t, t_ref = stats["token_ms"], ref["token_ms"]
        stats.update(predictor_share=min(1.0, max(0.0, (t - t_ref) / t)), predictor_ms=t - t_ref,
                     reference_token_ms=t_ref)
        extra = ("predictor_share",)
    elif getattr(source, "static", False):
        stats.update(predictor_share=0.0, predictor_ms=0.0)
        extra = ("predictor_share",)
    records = to_records(stats, {**common, "engine": "ours"}, extra)
    records[0].update(achieved)
    return records


def dense_engine(name, model, prompt, settings, session) -> dict:
    device = session.device
    if name == "ours":
        from kernels.decode import DenseMasks

        engine = _engine(model, DenseMasks(model.config.num_hidden_layers), settings, session, "all")
        stats = measure_ours(engine, prompt, settings, device)
        stats.update(kv="all", cuda_graph=bool(engine.use_graph), backend=engine.backend)
        return stats
    if name == "hf-eager":
        return measure_hf(model, prompt, settings, device, static=False)
    if name == "hf-static":
        return measure_hf(model, prompt, settings, device, static=True)
    if name == "deepspeed":
        return measure_hf(deepspeed_model(model), prompt, settings, device, static=False)
    raise HarnessError(f"unknown latency engine {name!r}; valid: {', '.join(ENGINES)}")


# ------------------------------------------------------------------------------------------------------------
# the latency table
# ------------------------------------------------------------------------------------------------------------
COLUMNS = [("prefill_ms", "prefill ms"), ("token_ms", "ms/token p50"), ("token_ms_p90", "p90"), ("token_ms_p99", "p99"),
           ("request_ms", "request ms"), ("tokens_per_s", "tokens/s"), ("peak_mem_gb", "peak GB"),
           ("floor_ms", "floor ms"), ("predictor_share", "predictor share")]
#: per-row fields of the first record (not metrics): the K/V policy used and, where both ran, each one's ms/token
INFO = [("kv", "kv"), ("token_ms_by_kv", "ms/token by kv"), ("head_change_rate", "head set changes")]


def _fmt(value, digits=2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"


def latency_markdown(records: list[dict]) -> str:
    """One row per (method, engine, sparsity): the figures side by side, × its floor, speed-ups over the dense
    baselines of the same model. Failed baselines are listed with their error."""
    records = [r for r in records if r.get("task") == "decode"]
    if not records:
        return ""
    blocks = []
    def block_key(r):
        return r["model"], r["weights"], r.get("dtype"), r.get("device"), r.get("batch")

    models = sorted(dict.fromkeys(block_key(r) for r in records), key=lambda k: tuple(str(x) for x in k[:4]) + (k[4] or 0,))
    for model, weights, dtype, device, _ in models:
        mine = [r for r in records if block_key(r) == (model, weights, dtype, device, _)]
        rows: dict = {}
        errors = []
        for r in mine:
            key = (r.get("method_label") or r["method"], str(r["sparsity"]))
            row = rows.setdefault(key, {"record": r})
            if r.get("error"):
                errors.append(f"- {key[0]}: {r['error']}")
            row[r["metric"]] = r["value"]
        dense = {label.split(" · ")[-1]: row.get("token_ms") for (label, _), row in rows.items() if label.startswith("dense · ")}
        first = mine[0]
        note = first.get("weights_note", weights)
        blocks.append(f"### {model} · {dtype} · {device} · weights: {weights} ({note}) · batch {first.get('batch')}, "
                      f"prompt {first.get('prompt_len')} + {first.get('new_tokens')} tokens · "
                      f"copy bandwidth {_fmt(first.get('copy_bandwidth_gbps'), 0)} GB/s · {first.get('timer')}\n")
        header = ["method · engine", "sparsity", "skipped h/n"] + [name for _, name in COLUMNS] + [
            "× floor", "× vs dense ours", "× vs hf-static", "× vs hf-eager"] + [name for _, name in INFO]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        order = sorted(rows, key=lambda k: (not k[0].startswith("dense"), k[1], k[0]))
        for key in order:
            row = rows[key]
            r = row["record"]
            token = row.get("token_ms")
            cells = [key[0], key[1], f"{r.get('achieved_heads') or 0:.2f}/{r.get('achieved_neurons') or 0:.2f}"]
            cells += [_fmt(row.get(metric), 3 if metric == "predictor_share" else 2) for metric, _ in COLUMNS]
            floor = row.get("floor_ms")
            cells.append(_fmt(token / floor) if token and floor else "–")
            for base in ("ours", "hf-static", "hf-eager"):
                ref = next((v for engine, v in dense.items() if engine.split("+")[0] == base), None)
                cells.append(_fmt(ref / token) if token and ref else "–")
            for field, _ in INFO:
                value = r.get(field)
                if isinstance(value, dict):
                    value = ", ".join(f"{k} {v:.2f}" for k, v in value.items())
                elif isinstance(value, float):
                    value = f"{value:.3f}"
                cells.append("–" if value is None else str(value))
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines) + "\n")
        if errors:
            blocks.append("Baselines that did not run:\n" + "\n".join(errors) + "\n")
    return "\n".join(blocks)


def write_latency_table(run_dir, records: list[dict]) -> None:
    """latency.md beside the records: this job's records and those already in the run folder."""
    import json
    from pathlib import Path

    from harness.store import write_atomic

    if run_dir is None:
        return
    path = Path(run_dir) / "records.jsonl"
    earlier = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    text = latency_markdown(earlier + records)
    if text:
        write_atomic(Path(run_dir) / "latency.md", "# Decode latency\n\n" + text)


def register() -> None:
    from harness.taskdefs import TASKS, TaskDef

    TASKS["decode"] = TaskDef("decode", "latency", "decode latency of one request (prefill + generated tokens): our "
                              "sparse engine with the method's predictor in the step, or dense baselines",
                              (), decode_task, masked=False)


register()
