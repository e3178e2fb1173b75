"""The key statistics' default corpus: text the model writes itself (top-k 50
sampling from its start token, seeded), so nothing is downloaded and the keys
are close to what the model has seen.

Sampling is the slow part of a first edit on a CPU, so the texts are kept: in
the statistics cache (`sampled-<hash>.json`), and for the embedded default
model in the package itself (`shipped_texts/`). Both hold one JSON object that
says which model wrote the texts (a weight fingerprint) and how many tokens of
what length were asked for; a file whose record does not match the model and
request is not used.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from tqdm.auto import tqdm

from ...anatomy import anatomy_of
from ...pack.fingerprint import base_model_record
from ...sampling import sample_texts, seeded

SHIPPED = Path(__file__).parent / "shipped_texts"
TOP_K = 50
# Rows sampled together: on a CPU a batch of 160 writes about twice the tokens per
# second that a batch of 16 does (docs/benchmarks.md); more rows than that gain little.
MAX_ROWS = 256


def self_sampled_texts(model, tokenizer, n_tokens: int, max_length: int, cache_dir: Path,
                       progress: bool = True) -> list[str]:
    """Texts of at most `max_length` tokens that the model samples itself, at least
    `n_tokens` tokens in all: read from `cache_dir` or the shipped texts when a file
    there records this model and request, else sampled and written to `cache_dir`.

    Example:
        >>> texts = self_sampled_texts(model, tokenizer, 20_000, 128, stats_dir())
    """
    record = texts_record(model, n_tokens, max_length)
    cached = cache_dir / f"sampled-{hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]}.json"
    for path in [cached, *sorted(SHIPPED.glob("*.json"))]:
        texts = read_texts(path, record)
        if texts is not None:
            return texts
    texts = sample_corpus(model, tokenizer, n_tokens, max_length, progress)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps({**record, "texts": texts}, ensure_ascii=False))
    tmp.replace(cached)  # atomic: a reader never sees half a file
    return texts


def texts_record(model, n_tokens: int, max_length: int) -> dict:
    """What a texts file must record to serve this model and request: the bf16
    hash of the first MLP output projection (as the statistics cache keys by it)."""
    module = anatomy_of(model).mlp_out(0)
    sha = base_model_record(model, [module])["fingerprint"][module]["sha256_bf16"]
    return {"module": module, "sha256_bf16": sha, "n_tokens": n_tokens, "max_length": max_length}


def read_texts(path: Path, record: dict) -> list[str] | None:
    """The texts of `path` if it records `record`; None if it is absent, unreadable
    (a half-written or older file, which is then sampled again) or of something else."""
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(held, dict) or any(held.get(k) != v for k, v in record.items()):
        return None
    texts = held.get("texts")
    return texts if isinstance(texts, list) and all(isinstance(t, str) for t in texts) else None


def sample_corpus(model, tokenizer, n_tokens: int, max_length: int, progress: bool = True) -> list[str]:
    """Sample until the texts hold `n_tokens` tokens as the statistics pass will read
    them back (decoding and re-tokenising does not give back every sampled token:
    early ends, merges). The bar counts sampled tokens, one step of every row at a
    time, so it moves and estimates evenly."""
    texts, made, new_tokens = [], 0, max_length - 1
    with seeded(0), tqdm(total=0, unit="tok", desc="key statistics: sampling text",
                         disable=not progress) as bar:
        while made < n_tokens:
            # One row more than the tokens asked for need, a tenth more for early ends.
            rows = min(MAX_ROWS, math.ceil(1.1 * (n_tokens - made) / new_tokens) + 1)
            bar.total += rows * new_tokens
            bar.refresh()
            for text in sample_texts(model, tokenizer, rows, new_tokens, top_k=TOP_K, on_step=bar.update):
                texts.append(text)
                made += len(tokenizer(text, truncation=True, max_length=max_length).input_ids)
    return texts
