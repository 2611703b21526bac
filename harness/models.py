"""Model specs: built-in exact configs of every family (OPT, Llama-2/3, Mistral, Qwen2), Hugging Face ids and local
directories; loading and tokenizers. The families and their built-in configs live in `harness.families`."""
from __future__ import annotations

import functools
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.families import builtin_models, family_of
from harness.identity import DigestCache, config_digest, directory_identity
from harness.families.opt import OPT_COMMON as _OPT_COMMON  # noqa: F401 - used by harness.reference_model
from harness.families.opt import OPT_SIZES, opt_config  # noqa: F401 - the OPT sizes, as before

WEIGHTS = ("pretrained", "random")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]  # weights, config, tokenizer


def builtin_names() -> list[str]:
    """Every built-in model name, family by family."""
    return list(builtin_models())


@dataclass(frozen=True)
class ModelSpec:
    """What model a job uses: `name` is a built-in config (`harness list models`), a local directory or a Hugging
    Face id."""

    name: str
    weights: str = "random"

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise HarnessError(f"unknown weights {self.weights!r}; valid: {', '.join(WEIGHTS)}")

    @property
    def kind(self) -> str:
        if self.name in builtin_models():
            return "builtin"
        if Path(self.name).is_dir():
            return "local"
        if "/" in self.name and not self.name.startswith((".", "/")):
            return "hub"
        raise HarnessError(
            f"unknown model {self.name!r}; valid: {', '.join(builtin_names())}, a local model directory, "
            "or a Hugging Face id (org/name)"
        )

    @property
    def source(self) -> str:
        """Where pretrained weights come from: the directory, or the Hugging Face id."""
        if self.kind != "builtin":
            return self.name
        hub_id = builtin_models()[self.name][1]
        if hub_id is None:
            raise HarnessError(f"{self.name} is a test config without a published checkpoint; use --weights random")
        return hub_id

    def config(self):
        """The model's transformers config, with its family's aliases (`Family.normalise_config`) when the
        harness has an adapter for it."""
        if self.kind == "builtin":
            return _normalised(builtin_models()[self.name][2]())
        from transformers import AutoConfig

        try:
            return _normalised(AutoConfig.from_pretrained(self.source))
        except OSError as exc:
            raise HarnessError(f"cannot read the config of model {self.name!r}: {exc}") from exc

    def identity(self, weight_seed: int = 0, cache_dir: str | Path | None = None) -> str:
        """What fits, artefacts and run folders are keyed by.

        Random weights: the architecture (the built-in size or hub id, or a local config's content) and the
        weight seed. Pretrained: the checkpoint's content (harness.identity): every tensor and the config and
        tokenizer files, hashed once and remembered in `cache_dir` by (path, size, mtime); a Hugging Face id
        is hashed from the local snapshot it loads from."""
        if self.weights == "random":
            architecture = config_digest(Path(self.name) / "config.json") if self.kind == "local" else self.name
            payload = [self.kind, architecture, "random", int(weight_seed)]
        else:
            payload = ["pretrained", directory_identity(self.checkpoint_dir(), DigestCache(cache_dir))]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    def checkpoint_dir(self) -> Path:
        """The directory pretrained weights are loaded from: the local directory, or the Hugging Face
        snapshot of the id (the one in the local cache, else downloaded into it)."""
        return Path(self.name) if self.kind == "local" else hub_snapshot(self.source)

    @property
    def label(self) -> str:
        return Path(self.name).name if self.kind == "local" else self.name


def _normalised(config):
    try:
        family = family_of(config)
    except HarnessError:  # not a supported family: validation says so (harness.validate.check_model)
        return config
    return family.normalise_config(config)


@functools.cache
def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a Hugging Face model: the cached one (no network), else downloaded now."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_PATTERNS))
    except Exception:  # noqa: BLE001 - not in the local cache (huggingface_hub raises several types)
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated model ...
        raise HarnessError(
            f"cannot get the pretrained weights of {repo_id} (not in the local Hugging Face cache, and the "
            f"download failed: {type(exc).__name__}: {exc}); use --weights random, or pass a local checkpoint "
            "directory as --model") from None


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise HarnessError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def init_random_weights(model, seed: int) -> None:
    """Seeded random weights that do not depend on where each parameter lives (CPU, one GPU, or sharded over
    several): every parameter has its own generator, seeded by (seed, parameter name), on its device.
    The distribution is Hugging Face's init: N(0, std) matrices and embeddings (std: OPT's `init_std`, Llama's
    `initializer_range`, from the family), zero biases, unit LayerNorm/RMSNorm weights, a zero padding
    embedding."""
    std = family_of(model).init_std(model.config)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters appear once
            generator = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
        embed = model.get_input_embeddings()
        if embed.padding_idx is not None:
            embed.weight[embed.padding_idx].zero_()


def _module_device(name: str, device_map: dict):
    parts = name.split(".")
    for cut in range(len(parts), -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in device_map:
            return device_map[prefix]
    raise HarnessError(f"device_map places no module holding {name}")


def load_model(spec: ModelSpec, *, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
               attn_implementation: str = "sdpa", device_map=None, layers: int | None = None):
    """Build the model: seeded random weights of the exact architecture, or pretrained via from_pretrained.

    layers: random weights only, the first `layers` decoder layers of the architecture (profiling scripts).

    device_map: None (all on `device`), "auto" (accelerate fills the GPUs in order, decoder layers whole), or
    a dict {module name: device} as accelerate takes it.
    """
    from transformers import AutoModelForCausalLM

    family = family_of(spec.config())  # an unsupported family is refused before any weight is read
    if layers is not None and spec.weights != "random":
        raise HarnessError("layers= builds a truncated model of random weights only")
    if spec.weights == "random":
        config = spec.config()
        if layers is not None:
            config.num_hidden_layers = int(layers)
        config._attn_implementation = attn_implementation
        with torch.device("meta"):  # no memory and no init until each parameter has its device
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        if device_map:
            from accelerate import dispatch_model, infer_auto_device_map
            from accelerate.utils import set_module_tensor_to_device

            if device_map == "auto":
                device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules, dtype=dtype)
            for name, param in list(model.named_parameters()):
                target = _module_device(name, device_map)
                set_module_tensor_to_device(model, name, target, value=torch.empty(param.shape, dtype=param.dtype,
                                                                                   device=target))
            for name, value in family.buffers(model, lambda name: _module_device(name, device_map)).items():
                set_module_tensor_to_device(model, name, value.device, value=value)
            model.tie_weights()
            init_random_weights(model, seed)
            model = dispatch_model(model, device_map=device_map)
        else:
            model = model.to_empty(device=device)
            _set_buffers(model, family.buffers(model, lambda name: device))
            model.tie_weights()
            init_random_weights(model, seed)
    else:
        kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
        if device_map:
            kwargs["device_map"] = device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(str(spec.checkpoint_dir()), **kwargs)
        except OSError as exc:
            raise HarnessError(
                f"cannot load pretrained weights for {spec.name!r} from {spec.source}: {exc}. "
                "Use --weights random, or pass a local checkpoint directory as --model"
            ) from exc
        if not device_map:
            model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    family_of(model).normalise_config(model.config)  # raises for a family the harness has no adapter for
    return model


def _set_buffers(model, values: dict) -> None:
    """Write computed buffers (e.g. rotary frequencies, which `to_empty` leaves uninitialised)."""
    with torch.no_grad():
        for name, value in values.items():
            module_name, _, buffer = name.rpartition(".")
            module = model.get_submodule(module_name)
            getattr(module, buffer).copy_(value)


#: tokens of OPT's tokenizer (the data directory's `tokenizer/opt`): ids 0 … 50264
OPT_TOKENIZER_SIZE = 50265


TOKENIZER_PATTERNS = ["tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "*.model", "config.json"]


def _has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).exists() for name in ("tokenizer_config.json", "tokenizer.json", "vocab.json"))


def hub_tokenizer(repo_id: str, why: str) -> Path:
    """The local snapshot of a Hugging Face repository's tokenizer files: cached, else downloaded now."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=TOKENIZER_PATTERNS))
    except Exception:  # noqa: BLE001 - not cached
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=TOKENIZER_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated
        raise HarnessError(
            f"{why}: the tokenizer of {repo_id} is not in the local Hugging Face cache and cannot be downloaded "
            f"({type(exc).__name__}); pass --tokenizer DIR (a folder holding tokenizer_config.json, vocab.json …), or "
            "an offline bundle (--data-dir / HARNESS_DATA_DIR) whose tokenizer/opt is OPT's") from None


def tokenizer_dir_for(spec: ModelSpec, tokenizer_dir: str | Path | None, data_dir=None) -> Path:
    """Where the tokenizer comes from, in this order: `--tokenizer` (a folder, or a Hugging Face id); the model's
    own (its directory; with pretrained weights, the checkpoint the weights load from); the bundle's OPT tokenizer
    (`tokenizer/opt`, its files checked: existence and sha256); for an OPT model with random weights and no bundle,
    OPT's tokenizer from the hub (facebook/opt-125m, the same for every size). Raises when there is none."""
    from harness.data import OPT_TOKENIZER_ID, TOKENIZER_FILES

    if tokenizer_dir:
        path = Path(tokenizer_dir)
        if path.is_dir():
            return path
        text = str(tokenizer_dir)
        if "/" in text and not text.startswith((".", "/", "~")) and not path.exists():  # a Hugging Face id
            return hub_tokenizer(text, f"--tokenizer {text}")
        raise HarnessError(f"tokenizer directory {path} does not exist (set --tokenizer to a folder holding "
                           "tokenizer_config.json, vocab.json …, or to a Hugging Face id such as facebook/opt-125m)")
    if spec.kind == "local" and _has_tokenizer(Path(spec.name)):
        return Path(spec.name)
    if spec.weights == "pretrained" and spec.kind != "local":
        snapshot = spec.checkpoint_dir()
        if _has_tokenizer(snapshot):
            return snapshot
    if data_dir is not None and getattr(data_dir, "kind", "bundle") == "bundle":
        data_dir.check(TOKENIZER_FILES)
        return data_dir.root / "tokenizer" / "opt"
    if spec.kind == "builtin" or (spec.kind == "local" and (Path(spec.name) / "config.json").exists()
                                  and json.loads((Path(spec.name) / "config.json").read_text()).get("model_type") == "opt"):
        return hub_tokenizer(OPT_TOKENIZER_ID, f"model {spec.label} with --weights {spec.weights} has no tokenizer of "
                                               "its own, so OPT's is used")
    if spec.kind == "hub":
        return hub_tokenizer(spec.name, f"model {spec.name}")
    raise HarnessError(f"no tokenizer for model {spec.label}: pass --tokenizer DIR (or a Hugging Face id), or an offline "
                       "bundle (--data-dir) that holds tokenizer/opt")


def uses_opt_tokenizer(spec: ModelSpec, tokenizer_dir, data_dir) -> bool:
    return data_dir is not None and tokenizer_dir_for(spec, tokenizer_dir, data_dir) == data_dir.root / "tokenizer" / "opt"


def check_vocabulary(spec: ModelSpec, config, tokenizer_dir, data_dir) -> None:
    """Refuse OPT's tokenizer for a model whose embedding has fewer rows than OPT's token ids (Llama-2 and
    Mistral embed 32000 tokens): pass the model's own tokenizer with --tokenizer."""
    if config.vocab_size < OPT_TOKENIZER_SIZE and uses_opt_tokenizer(spec, tokenizer_dir, data_dir):
        raise HarnessError(f"{spec.label} embeds {config.vocab_size} tokens, but text is read with OPT's tokenizer (the "
                           f"default for a model without its own), whose ids go up to {OPT_TOKENIZER_SIZE - 1}; pass "
                           "the model's tokenizer with --tokenizer DIR")


def load_tokenizer(spec: ModelSpec, tokenizer_dir: str | Path | None, data_dir=None):
    """The tokenizer of `tokenizer_dir_for`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir_for(spec, tokenizer_dir, data_dir)))
