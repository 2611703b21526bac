"""Token ids of whole texts (test sets, calibration text), tokenized once per (tokenizer, text): kept for the
session and cached on disk as an artefact, so evaluation and fit timings never include tokenization."""
from __future__ import annotations

import hashlib
import json

import torch

from harness.perplexity import tokenize_text


def tokenizer_fingerprint(tokenizer) -> str:
    """A content hash of the tokenizer: its serialised fast tokenizer, else its vocabulary and class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    special = json.dumps(sorted(map(str, tokenizer.all_special_tokens)))
    return hashlib.sha256((text + special).encode()).hexdigest()[:20]


def token_ids(session, name: str, text_of) -> torch.Tensor:
    """The int64 token ids of `text_of()` (the whole text at once), made once per session and cached on disk."""
    def make():
        text = text_of()
        fingerprint = session.memo("tokenizer_fingerprint", lambda: tokenizer_fingerprint(session.tokenizer))
        inputs = {"tokenizer": fingerprint, "text": hashlib.sha256(text.encode()).hexdigest()}

        def build():
            ids = tokenize_text(session.tokenizer, text)
            return {"ids": ids.to(torch.int32)}, {"name": name, "chars": len(text), "tokens": int(ids.numel())}

        return session.cache.get_or_build("tokens", inputs, build, fit=False).tensors["ids"].long()

    return session.memo(("tokens", name), make)
