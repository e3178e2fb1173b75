"""Second-moment statistics C = E[k kᵀ] of the keys of an MLP output projection
(its inputs), which ROME and MEMIT use to keep an edit from disturbing other
keys. Computed once per (model, layer, corpus) and cached as safetensors under
the Hugging Face cache folder, keyed by the model's fingerprint."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .anatomy import anatomy_of
from .batching import pad_id, padded
from .fingerprint import base_model_record
from .sampling import sample_texts, seeded


def stats_dir() -> Path:
    return Path(os.environ.get("HF_KEDIT_CACHE") or Path(constants.HF_HOME) / "hf_kedit") / "stats"


def key_second_moments(model, tokenizer, layers: list[int], corpus=None, n_tokens: int = 20_000,
                       max_length: int = 128, batch_size: int = 8, progress: bool = True) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] (float32, [d_ff, d_ff]) of the inputs k of each layer's MLP
    output projection over the non-pad tokens of `corpus` (an iterable of texts,
    a text file's path, or a `datasets` dataset with a "text" column; None: text
    sampled from the model itself), up to `n_tokens` tokens (the cache file's
    metadata records how many the corpus gave). Cached per (model weights, layer,
    corpus, tokens); layers missing from the cache share one pass.

    Example:
        >>> C = key_second_moments(model, tokenizer, [5], corpus=["some text", ...])[5]
    """
    anatomy = anatomy_of(model)
    names = {layer: anatomy.mlp_out(layer) for layer in layers}
    corpus_id = _corpus_id(corpus, max_length)
    fingerprint = base_model_record(model, list(names.values()))
    paths = {layer: stats_dir() / f"{_cache_key(fingerprint, name, corpus_id, n_tokens, max_length)}.safetensors"
             for layer, name in names.items()}
    missing = [layer for layer in layers if not paths[layer].is_file()]
    if missing:
        texts = _texts(model, tokenizer, corpus, n_tokens, max_length)
        computed = _accumulate(model, tokenizer, {l: model.get_submodule(names[l]) for l in missing}, texts,
                               n_tokens, max_length, batch_size, progress)
        for layer, (C, seen) in computed.items():
            _save(paths[layer], C, {"module": names[layer], "corpus": corpus_id, "n_tokens": str(n_tokens),
                                    "tokens_seen": str(seen), "base_model": fingerprint["name_or_path"]})
    return {layer: load_file(str(paths[layer]))["second_moment"] for layer in layers}


def _cache_key(fingerprint: dict, module: str, corpus_id: str, n_tokens: int, max_length: int) -> str:
    identity = [fingerprint["fingerprint"][module]["sha256_bf16"], fingerprint["model_type"], module, corpus_id,
                n_tokens, max_length]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def _save(path: Path, C: torch.Tensor, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"second_moment": C}, str(tmp), metadata={"format": "pt", **metadata})
    os.replace(tmp, path)  # atomic: a reader never sees half a file


@torch.no_grad()
def _accumulate(model, tokenizer, modules: dict, texts, n_tokens, max_length, batch_size,
                progress) -> dict[int, tuple[torch.Tensor, int]]:
    """Per layer, C over the first `n_tokens` non-pad tokens (fewer if the texts run out) and that count."""
    totals, count, captured = {}, 0, {}
    handles = [m.register_forward_pre_hook(lambda mod, args, layer=layer: captured.__setitem__(layer, args[0]))
               for layer, m in modules.items()]
    bar = tqdm(total=n_tokens, desc="key statistics (tokens)", disable=not progress)
    try:
        for start in range(0, len(texts), batch_size):
            rows = [tokenizer(t, truncation=True, max_length=max_length).input_ids
                    for t in texts[start:start + batch_size]]
            ids, mask = padded(rows, pad_id(tokenizer), model.device)
            model(input_ids=ids, attention_mask=mask)
            take = min(int(mask.sum()), n_tokens - count)
            for layer, k in captured.items():
                keys = k[mask.bool()].float()[:take]
                totals[layer] = keys.T @ keys + totals.get(layer, 0)
            count += take
            bar.update(take)
            if count >= n_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return {layer: ((total / count).cpu(), count) for layer, total in totals.items()}


def corpus_name(corpus) -> str:
    """How a pack's hyperparameters name the statistics' corpus (never the texts themselves)."""
    return "self-sampled" if corpus is None else str(corpus) if isinstance(corpus, (str, os.PathLike)) \
        else type(corpus).__name__


def _corpus_id(corpus, max_length: int) -> str:
    """A name for the corpus in the cache key."""
    if corpus is None:
        return f"self-sampled:{max_length}"
    return "sha256:" + hashlib.sha256("\x00".join(_corpus_texts(corpus)).encode()).hexdigest()


def _texts(model, tokenizer, corpus, n_tokens, max_length) -> list[str]:
    if corpus is None:
        # Sampling is the slow part (minutes on a CPU): keep the texts for the other layers.
        module = anatomy_of(model).mlp_out(0)
        identity = [base_model_record(model, [module])["fingerprint"][module]["sha256_bf16"], n_tokens, max_length]
        path = stats_dir() / f"sampled-{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]}.json"
        if path.is_file():
            return json.loads(path.read_text())
        texts = _sampled_texts(model, tokenizer, n_tokens, max_length)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(texts))
        return texts
    return _corpus_texts(corpus)


def _corpus_texts(corpus) -> list[str]:
    if isinstance(corpus, (str, os.PathLike)):
        return [p for p in Path(corpus).read_text().split("\n\n") if p.strip()]
    if hasattr(corpus, "column_names"):  # a datasets.Dataset
        return list(corpus["text"])
    return list(corpus)


def _sampled_texts(model, tokenizer, n_tokens, max_length, batch_size=16) -> list[str]:
    """Text the model writes itself (top-k 50 sampling, seeded): no download, and
    close to what the model has seen."""
    texts, made = [], 0
    with seeded(0), tqdm(total=n_tokens, desc="sampling text for key statistics (tokens)") as bar:
        while made < n_tokens:
            for text in sample_texts(model, tokenizer, batch_size, max_length - 1, top_k=50):
                # Count what the statistics pass will read back: decoding and re-tokenising
                # does not give back every sampled token (early ends, merges).
                n = len(tokenizer(text, truncation=True, max_length=max_length).input_ids)
                texts.append(text)
                made += n
                bar.update(n)
    return texts
