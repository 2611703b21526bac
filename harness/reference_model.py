"""Train the project's small reference OPT model (a test fixture "that has learned something").

No pretrained checkpoint can be downloaded on the project's machines, so the project trains a tiny
OPT-architecture model itself (pre-LN, ReLU, tied embeddings, OPT's tokenizer and vocabulary, 2048
positions) on text that is never used for evaluation: WikiText-2 valid, PTB valid and the LAMBADA
passages. (LAMBADA is therefore contaminated for this model: never report LAMBADA accuracy of it.)

    python -m harness.reference_model --out DIR [--steps N] [--data-dir DIR] ...
    python -m harness.reference_model --report-from DIR --report results/reports/reference-model.md

Training writes DIR/config.json, DIR/model.safetensors (float16), DIR/generation_config.json and
DIR/training.json (command, hyper-parameters, losses, held-out WikiText-2/PTB test perplexities with
the harness's own protocol, data files with their sha256, versions, GPU, wall time). The report mode
renders the markdown report from training.json alone, so no number in it is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

# Text used for training: the non-evaluation splits only (never wiki.test.* / ptb.test.txt).
TRAIN_FILES = ("wikitext-2/wiki.valid.tokens", "ptb/ptb.valid.txt", "lambada/lambada_test.jsonl")
FORBIDDEN_FILES = ("wikitext-2/wiki.test.raw", "wikitext-2/wiki.test.tokens", "ptb/ptb.test.txt")
TOKENIZER_FILES = ("tokenizer/opt/vocab.json", "tokenizer/opt/merges.txt", "tokenizer/opt/tokenizer_config.json")
UNK_FILLS = ("none", "wikitext2", "all")
FIXTURE_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "reference-opt"


def reference_config(*, hidden: int = 128, heads: int = 8, ffn: int = 512, layers: int = 6, dropout: float = 0.1):
    """The reference architecture: OPT's vocabulary and positions, pre-LN, ReLU, tied embeddings."""
    from transformers import OPTConfig

    from harness.models import _OPT_COMMON

    return OPTConfig(**{**_OPT_COMMON, "dropout": dropout}, hidden_size=hidden, num_attention_heads=heads,
                     ffn_dim=ffn, num_hidden_layers=layers, word_embed_proj_dim=hidden,
                     tie_word_embeddings=True, _name_or_path="sparsity-harness/reference-opt")


def fill_unknowns(text: str, words: list[str], seed: int, lower: bool = False) -> str:
    """Replace each `<unk>` with a rare word (seeded draw from `words`).

    WikiText-2 valid and PTB valid mark rare words `<unk>`, while the raw WikiText-2 test spells them
    out in BPE pieces that a model trained on `<unk>` has almost never seen; rare words from the
    LAMBADA passages (training text too) stand in for them.
    """
    import random

    rng = random.Random(seed)

    def pick(_match) -> str:
        word = rng.choice(words)
        return word.lower() if lower else word

    return re.sub(r"<unk>", pick, text)


def rare_words(passages: list[str], max_count: int = 2) -> list[str]:
    counts = Counter(w for text in passages for w in re.findall(r"\b[A-Za-z][a-z]{2,}\b", text))
    return sorted(w for w, c in counts.items() if c <= max_count)


def training_tokens(tokenizer, data, *, unk_fill: str = "none", seed: int = 0, only=None) -> dict:
    """Token ids of each training source (each document starts with OPT's BOS `</s>`, id 2); `only`: the names of
    the sources wanted (default all)."""
    import torch

    from harness.perplexity import tokenize_text

    for rel in TRAIN_FILES:
        assert rel not in FORBIDDEN_FILES
    with open(data.path("lambada/lambada_test.jsonl"), encoding="utf-8") as handle:
        passages = [json.loads(line)["text"] for line in handle if line.strip()]
    wiki, ptb = data.calibration_text("wikitext2-valid"), data.calibration_text("ptb-valid")
    # Each source is shaped like the test set it stands for: the raw WikiText-2 test has no `<unk>`,
    # the PTB test has (so PTB keeps its `<unk>` under the default `wikitext2`).
    if unk_fill not in UNK_FILLS:
        raise ValueError(f"unknown unk fill {unk_fill!r}; valid: {', '.join(UNK_FILLS)}")
    words = rare_words(passages)
    if unk_fill in ("wikitext2", "all"):
        wiki = fill_unknowns(wiki, words, seed)
    if unk_fill == "all":
        ptb = fill_unknowns(ptb, words, seed + 1, lower=True)
    sources = {
        "wikitext2-valid": tokenize_text(tokenizer, wiki),
        "ptb-valid": tokenize_text(tokenizer, ptb),
    }
    if only is None or "lambada-passages" in only:
        ids = tokenizer(passages).input_ids
        sources["lambada-passages"] = torch.tensor([t for row in ids for t in row], dtype=torch.long)
    return {name: ids for name, ids in sources.items() if only is None or name in only}


def split_holdout(sources: dict, fraction: float):
    """The last `fraction` of every source is held out (model selection); the rest is trained on."""
    import torch

    train, holdout = [], []
    for ids in sources.values():
        cut = int(len(ids) * (1 - fraction))
        train.append(ids[:cut])
        holdout.append(ids[cut:])
    return torch.cat(train), torch.cat(holdout)


#: What `holdout_text` reads: the training files (LAMBADA for the rare words that fill WikiText-2's `<unk>`) and the
#: tokenizer, all checked against the data directory's manifest before a run that calibrates on it.
HOLDOUT_READS = TRAIN_FILES + TOKENIZER_FILES
#: The held-out sources that are calibration text (LAMBADA's passages are its test set: never calibration text)
HOLDOUT_CALIBRATION_SOURCES = ("wikitext2-valid", "ptb-valid")


def holdout_ids(data, record: dict | None = None) -> dict:
    """The token ids the reference model never trained on, per calibration source: the last `holdout_fraction` of
    WikiText-2 valid and of PTB valid, cut exactly as its training run cut them (same `<unk>` fill, seed and
    fraction, read from the fixture's training.json). The training run used them only to pick its checkpoint by
    holdout NLL (it kept its last step)."""
    from harness.models import ModelSpec, load_tokenizer

    if record is None:
        record = json.loads((FIXTURE_DIR / "training.json").read_text())
    hp = record["hyperparameters"]
    tokenizer = load_tokenizer(ModelSpec("opt-125m"), None, data)
    sources = training_tokens(tokenizer, data, unk_fill=hp["unk_fill"], seed=hp["seed"], only=HOLDOUT_CALIBRATION_SOURCES)
    fraction = hp["holdout_fraction"]
    return {name: ids[int(len(ids) * (1 - fraction)):] for name, ids in sources.items()}


def holdout_text(data) -> str:
    """The calibration text `reference-holdout` (harness.data): the reference model's held-out WikiText-2 valid and
    PTB valid tokens (`holdout_ids`, about 12k + 4k tokens), decoded and joined with a blank line; a split the model
    never trained on, unlike `wikitext2-valid` and `ptb-valid`, which are its training text."""
    from harness.models import ModelSpec, load_tokenizer

    tokenizer = load_tokenizer(ModelSpec("opt-125m"), None, data)
    return "\n\n".join(tokenizer.decode(ids.tolist(), skip_special_tokens=True) for ids in holdout_ids(data).values())


def _register() -> None:
    from harness.data import CALIBRATION_TEXTS

    CALIBRATION_TEXTS["reference-holdout"] = holdout_text


_register()


def lr_at(step: int, *, steps: int, warmup: int, lr: float, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _sha256_entries(data, files) -> dict:
    out = {}
    for rel in files:
        data.path(rel)  # verifies against the manifest
        out[rel] = data.manifest.get(rel) or __import__("harness.data", fromlist=["sha256_file"]).sha256_file(
            data.root / rel)
    return out


def train(args) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoModelForCausalLM

    from harness.data import DataDir
    from harness.models import ModelSpec, load_model, load_tokenizer
    from harness.perplexity import perplexity, tokenize_text

    started = time.time()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    data = DataDir.resolve(args.data_dir)
    tokenizer = load_tokenizer(ModelSpec("opt-125m"), None, data)
    sources = training_tokens(tokenizer, data, unk_fill=args.unk_fill, seed=args.seed)
    train_ids, holdout_ids = split_holdout(sources, args.holdout)
    print(f"tokens: " + ", ".join(f"{k}={len(v)}" for k, v in sources.items())
          + f"; train={len(train_ids)} holdout={len(holdout_ids)}", flush=True)

    config = reference_config(hidden=args.hidden, heads=args.heads, ffn=args.ffn, layers=args.layers,
                              dropout=args.dropout)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads, ffn {args.ffn}; device {device}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_positions" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_positions" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  fused=device.startswith("cuda"))
    train_gpu = train_ids.to(device)
    holdout_gpu = holdout_ids.to(device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    offsets = torch.arange(args.seq_len, device=device)
    use_amp = device.startswith("cuda")

    def holdout_loss() -> float:
        model.eval()
        result = perplexity(model, holdout_gpu, seqlen=args.seq_len, batch_size=8)
        model.train()
        return result["mean_nll"]

    history, best = [], {"step": -1, "holdout_nll": float("inf")}
    best_state = None
    ema_loss, last_loss = None, None
    model.train()
    train_started = time.time()
    step = 0
    for step in range(args.steps):
        if time.time() - train_started > args.time_budget:
            print(f"time budget of {args.time_budget}s reached at step {step}", flush=True)
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps=args.steps, warmup=args.warmup, lr=args.lr)
        starts = torch.randint(0, len(train_ids) - args.seq_len + 1, (args.batch_size,), generator=generator)
        batch = train_gpu[starts.to(device)[:, None] + offsets]
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            last_loss = loss.item()
            ema_loss = last_loss if ema_loss is None else 0.8 * ema_loss + 0.2 * last_loss
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            nll = holdout_loss()
            history.append({"step": step + 1, "train_loss": last_loss, "holdout_nll": nll,
                            "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.time() - train_started, 1)})
            print(f"step {step + 1:5d}  train loss {last_loss:.3f}  holdout nll {nll:.3f} (ppl {math.exp(nll):.1f})"
                  f"  {time.time() - train_started:.0f}s", flush=True)
            if nll < best["holdout_nll"]:
                best = {"step": step + 1, "holdout_nll": nll, "train_loss": last_loss}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    steps_done = step + 1 if step + 1 == args.steps else step
    train_wall = time.time() - train_started
    if best_state is None:  # no evaluation happened (budget hit at once): keep the last weights
        best = {"step": steps_done, "holdout_nll": holdout_loss(), "train_loss": last_loss}
    else:
        model.load_state_dict(best_state)
    final_holdout = history[-1]["holdout_nll"] if history else best["holdout_nll"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    weights_bytes = (out / "model.safetensors").stat().st_size

    # Held-out evaluation of the saved float16 weights, loaded as the harness loads them (float32).
    def evaluate(spec: ModelSpec, dtype) -> dict:
        evaluated = load_model(spec, device=device, dtype=dtype)
        scores = {}
        from harness.data import _hf_wikitext_join

        texts = (("wikitext2", data.wikitext2_test()), ("ptb", data.ptb_test()),
                 ("wikitext2-unk", _hf_wikitext_join(data.path("wikitext-2/wiki.test.tokens"))))
        for name, text in texts:
            ids = tokenize_text(tokenizer, text)
            full = perplexity(evaluated, ids, seqlen=args.eval_seqlen, limit=args.eval_limit, batch_size=4)
            two = perplexity(evaluated, ids, seqlen=args.eval_seqlen, limit=2)
            scores[name] = {"value": full["value"], "stderr": full["stderr"], "windows": full["n"],
                            "tokens": full["tokens"], "value_2_windows": two["value"]}
        del evaluated
        return scores

    held_out = evaluate(ModelSpec(str(out), "pretrained"), torch.float32)
    random_baseline = evaluate(ModelSpec(str(out), "random"), torch.float32)
    for name, score in held_out.items():
        print(f"{name} test perplexity: {score['value']:.2f} over {score['windows']} windows "
              f"(2 windows: {score['value_2_windows']:.2f}); same architecture, random weights: "
              f"{random_baseline[name]['value']:.1f}", flush=True)

    record = {
        "model": "reference-opt",
        "command": " ".join([Path(sys.executable).name, "-m", "harness.reference_model", *sys.argv[1:]]),
        "architecture": {"hidden_size": args.hidden, "num_attention_heads": args.heads, "head_dim": args.hidden // args.heads,
                         "ffn_dim": args.ffn, "num_hidden_layers": args.layers, "vocab_size": config.vocab_size,
                         "max_position_embeddings": config.max_position_embeddings, "do_layer_norm_before": True,
                         "activation_function": "relu", "tie_word_embeddings": True, "parameters": n_params,
                         "saved_dtype": "float16", "weights_bytes": weights_bytes},
        "hyperparameters": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                            "lr": args.lr, "min_lr_ratio": 0.1, "schedule": "linear warmup + cosine",
                            "warmup": args.warmup, "weight_decay": args.weight_decay, "betas": [0.9, 0.95],
                            "clip": args.clip, "label_smoothing": args.label_smoothing,
                            "unk_fill": args.unk_fill, "dropout": args.dropout, "precision": "bf16 autocast" if use_amp else "float32",
                            "seed": args.seed, "holdout_fraction": args.holdout, "eval_every": args.eval_every,
                            "time_budget_s": args.time_budget, "selection": "lowest holdout NLL checkpoint"},
        "training": {"steps_done": steps_done, "selected_step": best["step"],
                     "train_loss_at_selected": best["train_loss"], "final_train_loss": last_loss,
                     "holdout_nll_at_selected": best["holdout_nll"], "final_holdout_nll": final_holdout,
                     "tokens": {k: len(v) for k, v in sources.items()}, "train_tokens": len(train_ids),
                     "holdout_tokens": len(holdout_ids),
                     "tokens_seen": steps_done * args.batch_size * args.seq_len,
                     "epochs": steps_done * args.batch_size * args.seq_len / len(train_ids),
                     "history": history, "train_wall_s": round(train_wall, 1)},
        "evaluation": {"protocol": f"harness.perplexity (non-overlapping {args.eval_seqlen}-token windows), "
                                   "saved float16 weights loaded in float32",
                       "limit": args.eval_limit, "held_out": held_out, "random_weights": random_baseline},
        "data": {"train_files": _sha256_entries(data, TRAIN_FILES), "tokenizer_files": _sha256_entries(data, TOKENIZER_FILES),
                 "eval_files": _sha256_entries(data, ("wikitext-2/wiki.test.raw", "ptb/ptb.test.txt",
                                                       "wikitext-2/wiki.test.tokens")),
                 "contaminated": ["lambada (its test passages are training text)"]},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(),
                        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
                        "device": device},
        "wall_time_s": round(time.time() - started, 1),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({weights_bytes / 2**20:.2f} MiB of weights) in {record['wall_time_s']}s", flush=True)
    return record


def render_report(record: dict, device_command: str | None = None, variants: list[dict] | None = None) -> str:
    """The markdown report, every number taken from training.json."""
    arch, hp, tr, ev = record["architecture"], record["hyperparameters"], record["training"], record["evaluation"]
    env = record["environment"]
    lines = [
        "# Reference model: `tests/fixtures/reference-opt`",
        "",
        "A tiny OPT-architecture model that the project trains itself (no pretrained checkpoint can be downloaded",
        "on the project's machines). Tests use it wherever a model \"that has learned something\" is needed.",
        "Generated by `python -m harness.reference_model --report-from tests/fixtures/reference-opt --report ...`",
        "from the fixture's `training.json`; no number below is typed by hand.",
        "",
        "## Model",
        f"- OPT architecture, pre-LN, ReLU, tied input/output embeddings: hidden {arch['hidden_size']}, "
        f"{arch['num_attention_heads']} heads (head dim {arch['head_dim']}), FFN {arch['ffn_dim']}, "
        f"{arch['num_hidden_layers']} layers, vocabulary {arch['vocab_size']} (OPT's tokenizer), "
        f"{arch['max_position_embeddings']} positions.",
        f"- {arch['parameters'] / 1e6:.2f}M parameters; saved as {arch['saved_dtype']} safetensors "
        f"({arch['weights_bytes'] / 2**20:.2f} MiB).",
        "- Load it with `ModelSpec('tests/fixtures/reference-opt', 'pretrained')`; the tokenizer is OPT's "
        "(`tokenizer/opt` in the data directory).",
        "",
        "## Training",
    ]
    if device_command:
        lines += ["The command run on the device machine (the `run` tool's command line):", "", "```",
                  device_command, "```", ""]
    lines += [
        f"- Script command: `{record['command']}`",
        f"- Machine: {env['gpu'] or env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"Python {env['python']}.",
        f"- Wall time: {record['wall_time_s']} s in all ({tr['train_wall_s']} s of training).",
        "- Training text (never the evaluation splits): "
        + ", ".join(f"`{rel}` (sha256 `{sha[:12]}…`)" for rel, sha in record["data"]["train_files"].items())
        + "; tokens per source: " + ", ".join(f"{k} {v}" for k, v in tr["tokens"].items())
        + f". The last {hp['holdout_fraction']:.0%} of each source is held out for checkpoint selection "
        f"({tr['holdout_tokens']} tokens); {tr['train_tokens']} tokens are trained on.",
        f"- **Contamination: LAMBADA's test passages are training text**, so LAMBADA scores of this model mean nothing.",
        f"- AdamW (betas {hp['betas']}, weight decay {hp['weight_decay']}), lr {hp['lr']} with {hp['warmup']} warmup steps "
        f"and cosine decay to {hp['min_lr_ratio']}×, {hp['precision']}, batch {hp['batch_size']} × {hp['seq_len']} tokens "
        f"(random crops of the token stream), dropout {hp['dropout']}, gradient clip {hp['clip']}, "
        f"label smoothing {hp.get('label_smoothing', 0.0)}, seed {hp['seed']}.",
        "- `<unk>`: " + {"none": "kept as the literal text `<unk>` in WikiText-2 valid and PTB valid",
                         "wikitext2": "in WikiText-2 valid replaced by rare words (seen at most twice) drawn from the "
                                      "LAMBADA passages, so that the model learns to spell rare words in BPE pieces as "
                                      "the raw WikiText-2 test does; kept in PTB valid, as the PTB test has it",
                         "all": "in WikiText-2 valid and PTB valid replaced by rare LAMBADA words",
                         }[hp.get("unk_fill", "none")] + ".",
        f"- Steps: {tr['steps_done']} of {hp['steps']} ({tr['epochs']:.1f} epochs, {tr['tokens_seen']} tokens seen); "
        f"kept the checkpoint of step {tr['selected_step']} ({hp['selection']}).",
        f"- Final train loss (cross-entropy with label smoothing {hp.get('label_smoothing', 0.0)}) {tr['final_train_loss']:.4f}; train loss at the kept step {tr['train_loss_at_selected']:.4f}; "
        f"holdout NLL at the kept step {tr['holdout_nll_at_selected']:.4f} (perplexity {math.exp(tr['holdout_nll_at_selected']):.2f}).",
        "",
        "## Held-out perplexity",
        f"Protocol: {ev['protocol']}" + (f", first {ev['limit']} windows" if ev["limit"] else ", all windows") + ".",
        "",
        "| test set | windows | tokens | perplexity | ± stderr | first 2 windows | random weights, same architecture |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"wikitext2": "WikiText-2 test (raw; the harness's `wikitext2` task)", "ptb": "PTB test",
             "wikitext2-unk": "WikiText-2 test, `<unk>` version (`wiki.test.tokens`; diagnostic only)"}
    for key, score in ev["held_out"].items():
        rnd = ev["random_weights"][key]
        err = f"{score['stderr']:.2f}" if score["stderr"] is not None else "—"
        lines.append(f"| {names.get(key, key)} | {score['windows']} | {score['tokens']} | {score['value']:.2f} | {err} "
                     f"| {score['value_2_windows']:.2f} | {rnd['value']:.1f} |")
    if variants:
        lines += ["", "## Variants trained in the same command (selection by holdout NLL, never by a test set)", "",
                  "| variant | label smoothing | dropout | steps | holdout NLL at kept step | kept |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for rec in [record, *variants]:
            vh, vt = rec["hyperparameters"], rec["training"]
            lines.append(f"| `{rec['command'].split('--out ')[-1].split()[0]}` | {vh.get('label_smoothing', 0.0)} "
                         f"| {vh['dropout']} | {vt['steps_done']} | {vt['holdout_nll_at_selected']:.4f} "
                         f"| {'yes' if rec is record else 'no'} |")
    lines += ["", "## Training curve", "", "| step | train loss | holdout NLL | lr | elapsed (s) |", "| --- | --- | --- | --- | --- |"]
    for row in tr["history"]:
        lines.append(f"| {row['step']} | {row['train_loss']:.4f} | {row['holdout_nll']:.4f} | {row['lr']:.2e} | {row['elapsed_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.reference_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="directory to write the model and training.json into")
    parser.add_argument("--data-dir", default=None, help="data directory (default: HARNESS_DATA_DIR, else ../shared/data)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--unk-fill", choices=UNK_FILLS, default="wikitext2",
                        help="replace <unk> with rare LAMBADA words in WikiText-2 valid, in it and PTB valid, or nowhere")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=float, default=0.05, help="fraction of each source held out for selection")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-limit", type=int, default=None, help="test windows to score (default: all)")
    parser.add_argument("--time-budget", type=float, default=300.0, help="stop training after this many seconds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--report-from", default=None, help="render the report from DIR/training.json and exit")
    parser.add_argument("--report", default=None, help="where to write the markdown report")
    parser.add_argument("--device-command", default=None, help="the device command line, quoted in the report")
    parser.add_argument("--variants", nargs="*", default=[], help="training.json files of variants not kept")
    args = parser.parse_args(argv)
    if args.report_from:
        record = json.loads((Path(args.report_from) / "training.json").read_text())
        variants = [json.loads(Path(p).read_text()) for p in args.variants]
        text = render_report(record, args.device_command, variants)
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(text)
        else:
            print(text)
        return 0
    if not args.out:
        parser.error("--out is required (or --report-from)")
    record = train(args)
    if args.report:
        Path(args.report).write_text(render_report(record, args.device_command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
