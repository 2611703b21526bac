"""Model specs: built-in exact OPT configs, Hugging Face ids and local directories; loading and tokenizers."""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import HarnessError

# Exact architectures of the published OPT checkpoints (facebook/opt-*/config.json); the rest of each
# config is shared and listed in _OPT_COMMON.
OPT_SIZES: dict[str, dict] = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, word_embed_proj_dim=768),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, word_embed_proj_dim=2048),
    "opt-2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240, word_embed_proj_dim=2560),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384, word_embed_proj_dim=4096),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480, word_embed_proj_dim=5120),
    "opt-30b": dict(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672, word_embed_proj_dim=7168),
    "opt-66b": dict(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864, word_embed_proj_dim=9216),
}
_OPT_COMMON = dict(
    vocab_size=50272, max_position_embeddings=2048, activation_function="relu", do_layer_norm_before=True,
    dropout=0.1, attention_dropout=0.0, layerdrop=0.0, init_std=0.02, enable_bias=True,
    layer_norm_elementwise_affine=True, bos_token_id=2, eos_token_id=2, pad_token_id=1, use_cache=True,
)
WEIGHTS = ("pretrained", "random")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def opt_config(name: str):
    from transformers import OPTConfig

    return OPTConfig(**{**_OPT_COMMON, **OPT_SIZES[name]}, _name_or_path=f"facebook/{name}")


@dataclass(frozen=True)
class ModelSpec:
    """What model a job uses: `name` is a built-in OPT size, a local directory or a Hugging Face id."""

    name: str
    weights: str = "random"

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise HarnessError(f"unknown weights {self.weights!r}; valid: {', '.join(WEIGHTS)}")

    @property
    def kind(self) -> str:
        if self.name in OPT_SIZES:
            return "builtin"
        if Path(self.name).is_dir():
            return "local"
        if "/" in self.name and not self.name.startswith((".", "/")):
            return "hub"
        raise HarnessError(
            f"unknown model {self.name!r}; valid: {', '.join(OPT_SIZES)}, a local model directory, "
            "or a Hugging Face id (org/name)"
        )

    @property
    def source(self) -> str:
        """Where pretrained weights come from: the directory, or the Hugging Face id."""
        return f"facebook/{self.name}" if self.kind == "builtin" else self.name

    def config(self):
        if self.kind == "builtin":
            return opt_config(self.name)
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.source)
        except OSError as exc:
            raise HarnessError(f"cannot read the config of model {self.name!r}: {exc}") from exc

    def identity(self) -> str:
        """A content id for cache keys: the config plus, for local checkpoints, the weight files."""
        digest = hashlib.sha256(json.dumps([self.name if self.kind != "local" else "local", self.weights],
                                           sort_keys=True).encode())
        if self.kind == "local":
            root = Path(self.name)
            for path in sorted(root.iterdir()):
                if path.suffix in (".json", ".safetensors", ".bin") and path.is_file():
                    digest.update(path.name.encode())
                    digest.update(str(path.stat().st_size).encode())
                    with open(path, "rb") as handle:  # the head of each file: cheap and catches re-training
                        digest.update(handle.read(1 << 20))
        return digest.hexdigest()[:16]

    @property
    def label(self) -> str:
        return Path(self.name).name if self.kind == "local" else self.name


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
    The distribution is Hugging Face's OPT init: N(0, init_std) matrices and embeddings, zero biases, unit
    LayerNorm weights, a zero padding embedding."""
    std = model.config.init_std
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
               attn_implementation: str = "sdpa", device_map=None):
    """Build the model: seeded random weights of the exact architecture, or pretrained via from_pretrained.

    device_map: None (all on `device`), "auto" (accelerate fills the GPUs in order, decoder layers whole), or
    a dict {module name: device} as accelerate takes it.
    """
    from transformers import AutoModelForCausalLM

    if spec.weights == "random":
        config = spec.config()
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
            model.tie_weights()
            init_random_weights(model, seed)
            model = dispatch_model(model, device_map=device_map)
        else:
            model = model.to_empty(device=device)
            model.tie_weights()
            init_random_weights(model, seed)
    else:
        kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
        if device_map:
            kwargs["device_map"] = device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(spec.source, **kwargs)
        except OSError as exc:
            raise HarnessError(
                f"cannot load pretrained weights for {spec.name!r} from {spec.source}: {exc}. "
                "Use --weights random, or pass a local checkpoint directory as --model"
            ) from exc
        if not device_map:
            model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    if getattr(model.config, "model_type", None) != "opt":
        raise HarnessError(f"model {spec.name!r} is a {model.config.model_type!r} model; the harness supports OPT")
    return model


def load_tokenizer(spec: ModelSpec, tokenizer_dir: str | Path | None, data_dir=None):
    """The model directory's tokenizer if it has one, else `tokenizer_dir`, else OPT's in the data directory."""
    from transformers import AutoTokenizer

    candidates = []
    if tokenizer_dir:
        candidates.append(Path(tokenizer_dir))
    elif spec.kind == "local" and any((Path(spec.name) / f).exists() for f in ("tokenizer_config.json", "vocab.json")):
        candidates.append(Path(spec.name))
    elif data_dir is not None:
        for rel in ("tokenizer/opt/vocab.json", "tokenizer/opt/merges.txt", "tokenizer/opt/tokenizer_config.json"):
            data_dir.path(rel)  # existence and sha256
        candidates.append(data_dir.root / "tokenizer" / "opt")
    for path in candidates:
        if not path.is_dir():
            raise HarnessError(f"tokenizer directory {path} does not exist (set --tokenizer)")
        return AutoTokenizer.from_pretrained(str(path))
    raise HarnessError("no tokenizer: pass --tokenizer DIR or a data directory that holds tokenizer/opt")
