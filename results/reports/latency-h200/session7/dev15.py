"""Dev check for issue 15 on the GPU: equivalences of the new sources (lookahead stream, graphs, global, union),
the top-k kernel, then OPT-13B timings with seeded predictors (lookahead on/off, kv all/recompute)."""
import importlib.util, os, sys, time, traceback
os.environ["TRITON_INTERPRET"] = "0"  # tests/conftest.py would turn the interpreter on
import torch
DEV = "cuda" if torch.cuda.is_available() else "cpu"
sys.path.insert(0, os.getcwd())
OUT = os.environ.get("OUT", "/tmp")
T0 = time.time()
def log(*a):
    line = f"[{time.time()-T0:6.1f}s] " + " ".join(str(x) for x in a)
    print(line, flush=True)
    open(os.path.join(OUT, "dev15.log"), "a").write(line + "\n")

spec = importlib.util.spec_from_file_location("tl", "tests/test_latency.py")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
T = importlib.util.module_from_spec(spec)
try:
    spec.loader.exec_module(T)
except Exception:
    log("import tests.test_latency failed", traceback.format_exc())
    raise
from harness.decoding import source_for
from harness.engine import Allocation, MaskedEngine
from kernels.decode import SparseDecoder
from kernels.equivalence import relative_errors, sparse_engine_logits

def part_equiv():
    torch.manual_seed(0)
    model = T._model().to(DEV)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 512, (1, T.PROMPT), generator=g).to(DEV)
    tokens = torch.randint(0, 512, (T.STEPS,), generator=g).to(DEV)
    for label in T.METHODS:
        policy, allocation = T.make_policy(label, model)
        expected = T.masked_logits(model, T.PromptDense(policy), allocation, prompt, tokens)
        for look, graph, kv in ((False, False, "recompute"), (True, True, "recompute"), (True, True, "all"),
                                (True, False, "all")):
                if True:
                    try:
                        policy, allocation = T.make_policy(label, model)
                        source = source_for(label, policy, allocation, model)
                        if hasattr(source, "lookahead"):
                            source.lookahead = look
                        elif look:
                            continue
                        engine = SparseDecoder(model, source, max_len=16, kv=kv, backend="triton", cuda_graph=graph)
                        errs, agree = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
                        log(f"EQUIV {label:18s} look={look} graph={graph} kv={kv}: max rel err {max(errs):.2e} "
                            f"argmax {sum(agree)}/{len(agree)} {'PASS' if max(errs) < 1e-4 else 'FAIL'}")
                    except Exception as exc:
                        log(f"EQUIV {label} look={look} graph={graph} kv={kv}: ERROR {type(exc).__name__}: {exc}")
                        log(traceback.format_exc()[-1500:])
    for label in ("shadow", "dejavu:shadowllm"):
        for graph in (False, True):
            try:
                policy, _ = T.make_policy(label, model)
                allocation = Allocation(0.5, 0.7, mode="global", dense_layers=(0,))
                eng = MaskedEngine(model, policy, allocation)
                with torch.no_grad():
                    res = model(input_ids=prompt, use_cache=True)
                    past, expected = res.past_key_values, [res.logits[:, -1].float()]
                    with eng.applied():
                        for t in tokens:
                            res = model(input_ids=t.view(1, 1), past_key_values=past, use_cache=True)
                            past = res.past_key_values
                            expected.append(res.logits[:, -1].float())
                policy, _ = T.make_policy(label, model)
                engine = SparseDecoder(model, source_for(label, policy, allocation, model), max_len=16, kv="recompute",
                                       backend="triton", cuda_graph=graph)
                errs, agree = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
                log(f"EQUIV global {label} graph={graph}: max rel err {max(errs):.2e} {'PASS' if max(errs) < 1e-4 else 'FAIL'}")
            except Exception as exc:
                log(f"EQUIV global {label} graph={graph}: ERROR {type(exc).__name__}: {exc}")
                log(traceback.format_exc()[-1500:])

def part_topk():
    from kernels.topk import select, _select_torch
    for dtype in (torch.float16, torch.bfloat16):
        for B, n, k in [(1, 40, 20), (1, 20480, 2048), (4, 20480, 2048), (1, 40 * 20480, 0)][:3]:
            s = torch.randn(B, 3, n, device="cuda").to(dtype)
            got = select(s, k)
            ref = select(s, k, triton_kernel=False)
            ok = torch.equal(got.long(), ref.long())
            out = torch.zeros(3, n, dtype=torch.int32, device="cuda"); c = torch.zeros(3, dtype=torch.int32, device="cuda")
            out2, c2 = out.clone(), c.clone()
            select(s, k, combine="union", out=out, counts=c); select(s, k, combine="union", out=out2, counts=c2, triton_kernel=False)
            ok2 = torch.equal(c, c2) and all(torch.equal(out[r, :c[r]], out2[r, :c2[r]]) for r in range(3))
            torch.cuda.synchronize(); t = time.time()
            for _ in range(200): select(s[:, :1], k)
            torch.cuda.synchronize(); ms = (time.time() - t) / 200 * 1e3
            log(f"TOPK {dtype} B={B} n={n} k={k}: mean {'PASS' if ok else 'FAIL'} union {'PASS' if ok2 else 'FAIL'}; one row {ms*1e3:.1f} us (host loop)")

def part_timing():
    import harness.tools.latency_bench as lb
    import argparse
    lb.ARGS = argparse.Namespace(small=False, budget=400)
    lb.OUT = __import__("pathlib").Path(OUT)
    from harness.engine import Allocation
    from harness.latency import copy_bandwidth, measure_ours
    from kernels.sources import reference_source
    bw = copy_bandwidth("cuda")
    bench = lb.Bench("opt-13b", bw)
    S = dict(lb.SETTINGS, repeats=1)
    rows = []
    def run(label, source, kv):
        engine = bench.engine(source, kv)
        try:
            st = measure_ours(engine, bench.prompt, S, "cuda")
        except Exception as exc:
            log(f"TIME {label} kv={kv}: ERROR {type(exc).__name__}: {exc}"); log(traceback.format_exc()[-1200:]); return None
        pb = source.predictor_bytes() if hasattr(source, "predictor_bytes") else 0
        floor = (engine.weight_bytes() + pb) / bw * 1e3
        log(f"TIME {label:40s} kv={kv:9s}: {st['token_ms']:.3f} ms/token floor {floor:.3f} x{st['token_ms']/floor:.2f}")
        rows.append((label, kv, st["token_ms"], floor))
        del engine
        return st["token_ms"]
    from kernels.decode import DenseMasks
    run("dense", DenseMasks(bench.L), "all")
    st = source_for("static", lb.static_policy(bench.model), Allocation(0.5, 0.9), bench.model)
    for kv in ("recompute", "all"):
        run("static h0.5/n0.9", st, kv)
    for method, alloc in (("dejavu", Allocation(0.5, 0.9)), ("shadow", Allocation(0.5, 0.9, dense_layers=(0,))),
                          ("timewise", Allocation(0.5, 0.0))):
        policy = lb.predictors(method, bench.model)
        label = method if method != "timewise" else "timewise:current"
        for look in (True, False):
            for kv in ("all", "recompute"):
                if not look and kv == "recompute" and method != "dejavu":
                    continue
                src = source_for(label, policy, alloc, bench.model)
                src.lookahead = look
                run(f"{label} h0.5/n0.9 look={look}", src, kv)
                del src
        src = source_for(label, policy, alloc, bench.model)
        run(f"{label} reference (static, same counts)", reference_source(src, bench.L), "all")
        del policy, src
        torch.cuda.empty_cache()
    policy = lb.predictors("timewise", bench.model)
    from methods.timewise import TimewisePolicy
    for variant in ("last", "time"):
        p2 = TimewisePolicy(variant, policy.predictors, policy.lookback)
        src = source_for("timewise:" + variant, p2, Allocation(0.5, 0.0), bench.model)
        run(f"timewise:{variant} h0.5 look=True", src, "all")
    log("SUMMARY")
    for r in rows:
        log(f"  {r[0]:40s} {r[1]:9s} {r[2]:.3f} ms  floor {r[3]:.3f}")

for part in ((part_topk, part_equiv, part_timing) if DEV == "cuda" else (part_equiv,)):
    try:
        part()
    except Exception:
        log(f"{part.__name__} FAILED", traceback.format_exc())
log("done")
