"""Second-moment statistics C = E[k kᵀ] of the keys of an MLP output projection
(its inputs), which ROME and MEMIT use to keep an edit from disturbing other
keys. Computed once per (model, layer, corpus) and cached as safetensors under
the Hugging Face cache folder, keyed by the model's fingerprint; shared through
the Hub with `push_stats` and read back with `key_second_moments(source=...)`.

A shared statistics folder (on disk or a Hub repo):
    kedit_stats.json          manifest: format_version, base_model (fingerprint of the
                              modules), corpus, corpus_name, n_tokens, max_length, and per
                              layer its module, tokens_seen and the sha256 of its file
    layer-<i>.safetensors     "second_moment": C, float32 [d_ff, d_ff]
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import reduce
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ...cache import cache_root
from ...version import __version__
from ...anatomy import anatomy_of, execution_device, input_device, linear_shape
from ...batching import pad_id, padded
from ...errors import StatsError
from ...pack.fingerprint import base_model_record
from ...pack.format import read_manifest
from ...pack.hub import file_sha256, push_folder, read_listed_safetensors, resolve_source
from ...partial_forward import run_until
from ...processes import process_state
from ..setting import setting
from .self_sampled import self_sampled_texts

STATS_MANIFEST = "kedit_stats.json"
STATS_FORMAT_VERSION = 1
TEXT_LENGTH = 128  # tokens per text of the corpus, at most


@dataclass
class StatisticsConfig:
    """Where a method's key statistics C come from (ROME, MEMIT, STEAM)."""

    covariance: bool = setting(True, "use C = E[k kᵀ] of the edited projection's keys (False: C = I)",
                               "ROME's paper and code (mom2_adjustment; EasyEdit's Llama ROME settings turn it off); "
                               "measured here: C buys locality cmp 0.02-0.03 (docs/locate-and-edit.md)")
    stats_tokens: int = setting(20_000, "tokens C is computed over", "measured here: 1,000 to 20,000 tokens give the "
                                "same scores within 0.01 on 40 held-apart cases (docs/locate-and-edit.md); ROME's "
                                "code reads 100,000 Wikipedia samples")
    stats_corpus: object = setting(None, "the texts C is computed over: a list of texts, a text file or a datasets "
                                   "dataset with a text column (None: text the model samples itself)",
                                   "chosen here: nothing to download; the default model's texts ship with the "
                                   "package (docs/decisions.md)")
    stats_source: str | None = setting(None, "a folder or Hub repo id written by push_stats, read where the local "
                                       "cache lacks the statistics", "none: computed here unless given")


def stats_dir() -> Path:
    return cache_root() / "stats"


def stats_file(layer: int) -> str:
    """The name of a layer's file in a shared statistics folder."""
    return f"layer-{layer}.safetensors"


def key_second_moments(model, tokenizer, layers: list[int], corpus=None, n_tokens: int = 20_000,
                       max_length: int = TEXT_LENGTH, batch_size: int = 8, progress: bool = True,
                       source: str | os.PathLike | None = None) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] (float32, [d_ff, d_ff]) of the inputs k of each layer's MLP
    output projection over the non-pad tokens of `corpus` (an iterable of texts,
    a text file's path, or a `datasets` dataset with a "text" column; None: text
    sampled from the model itself), up to `n_tokens` tokens (the cache file's
    metadata records how many the corpus gave). Cached per (model weights, layer,
    corpus, tokens); layers missing from the cache share one pass, or, given
    `source` (a folder or Hub repo id that `push_stats` wrote for the same model,
    corpus and token count), are read from there, validated and cached instead.

    Example:
        >>> C = key_second_moments(model, tokenizer, [5], corpus=["some text", ...])[5]
        >>> C = key_second_moments(model, tokenizer, [5], source="me/smollm2-stats")[5]
    """
    cached = _cached(model, tokenizer, layers, corpus, n_tokens, max_length, batch_size, progress, source)
    return {layer: load_file(str(path))["second_moment"] for layer, path in cached.paths.items()}


def push_stats(model, tokenizer, layers: list[int], repo_id: str, corpus=None, n_tokens: int = 20_000,
               max_length: int = TEXT_LENGTH, batch_size: int = 8, branch: str | None = None, private: bool = False,
               token: str | None = None, progress: bool = True) -> str:
    """Upload the key statistics of `layers` (computed, or read from the local cache)
    to `repo_id` as one commit: one safetensors file per layer and the manifest
    `kedit_stats.json`. The commit replaces the manifest, so push every layer to
    share at once. Returns the commit sha.

    Example:
        >>> push_stats(model, tokenizer, [5], "me/smollm2-stats")
        >>> # elsewhere, on the same model: no statistics pass
        >>> pack = rome_edit(model, tokenizer, [edit], ROMEConfig(stats_source="me/smollm2-stats"))
    """
    cached = _cached(model, tokenizer, layers, corpus, n_tokens, max_length, batch_size, progress, source=None)

    def write(folder: Path) -> None:
        entries = {}
        for layer, path in cached.paths.items():
            shutil.copyfile(path, folder / stats_file(layer))
            with safe_open(str(path), framework="pt") as f:
                seen = int(f.metadata()["tokens_seen"])
            entries[str(layer)] = {"module": cached.names[layer], "tokens_seen": seen,
                                   "sha256": file_sha256(folder / stats_file(layer))}
        manifest = {"format_version": STATS_FORMAT_VERSION, **cached.asked, "corpus_name": corpus_name(corpus),
                    "base_model": cached.fingerprint, "layers": entries, "created_with": f"hf_kedit {__version__}"}
        (folder / STATS_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")

    return push_folder(write, repo_id, f"hf_kedit: key statistics of layers {sorted(layers)}", branch, private,
                       token)


@dataclass
class _Cached:
    """Statistics in the local cache: per layer its module and file, and what they are of."""

    names: dict[int, str]  # layer -> MLP output projection
    fingerprint: dict  # base_model_record of those modules
    asked: dict  # corpus id, n_tokens, max_length: what a shared folder must hold too
    paths: dict[int, Path]


def _cached(model, tokenizer, layers, corpus, n_tokens, max_length, batch_size, progress, source) -> _Cached:
    """The cache entries of `layers`, those missing read from `source` or computed."""
    anatomy = anatomy_of(model)
    names = {layer: anatomy.mlp_out(layer) for layer in layers}
    fingerprint = base_model_record(model, list(names.values()))
    asked = {"corpus": _corpus_id(corpus, max_length), "n_tokens": n_tokens, "max_length": max_length}
    paths = {layer: stats_dir() / f"{_cache_key(fingerprint, name, **asked)}.safetensors"
             for layer, name in names.items()}
    missing = {layer: names[layer] for layer in layers if not paths[layer].is_file()}
    if missing:
        found = (_fetch(source, model, missing, fingerprint, asked) if source is not None
                 else _compute(model, tokenizer, missing, corpus, n_tokens, max_length, batch_size, progress))
        for layer, (C, seen) in found.items():
            _save(paths[layer], C, {"module": names[layer], "corpus": asked["corpus"], "n_tokens": str(n_tokens),
                                    "tokens_seen": str(seen), "base_model": fingerprint["name_or_path"],
                                    **({"source": str(source)} if source is not None else {})})
    return _Cached(names, fingerprint, asked, paths)


def _compute(model, tokenizer, names: dict[int, str], corpus, n_tokens, max_length, batch_size,
             progress) -> dict[int, tuple[torch.Tensor, int]]:
    # Several processes: the first samples the texts and caches them, the others then read them.
    with process_state().main_process_first():
        texts = (self_sampled_texts(model, tokenizer, n_tokens, max_length, stats_dir(), progress) if corpus is None
                 else _corpus_texts(corpus))
    return _accumulate(model, tokenizer, {layer: model.get_submodule(name) for layer, name in names.items()}, texts,
                       n_tokens, max_length, batch_size, progress)


def _fetch(source, model, names: dict[int, str], fingerprint: dict, asked: dict) -> dict[int, tuple[torch.Tensor, int]]:
    """Per layer, C and its token count from a shared statistics folder or repo,
    every file checked before any is returned: `StatsError` if anything is wrong."""
    folder, _ = resolve_source(source, allow_patterns=[STATS_MANIFEST, *map(stats_file, names)])
    manifest = _read_manifest(folder, source)
    held = manifest["layers"]
    absent = [layer for layer in names if str(layer) not in held]
    if absent:
        raise StatsError(f"{source} holds statistics of layers {sorted(map(int, held))}, not of {absent}: push "
                         "them from this model (push_stats, kedit push-stats), or leave stats_source unset to "
                         "compute them here")
    theirs = manifest["base_model"]["fingerprint"]
    for layer, name in names.items():
        module = held[str(layer)]["module"]
        mine = fingerprint["fingerprint"][name]["sha256_bf16"]
        if module != name or theirs.get(module, {}).get("sha256_bf16") != mine:
            raise StatsError(f"the statistics of layer {layer} in {source} were computed on {module} of another "
                             f"model ({manifest['base_model'].get('name_or_path') or 'unnamed'}), not on this "
                             f"model's {name}: push statistics from this model, or leave stats_source unset to "
                             "compute them here")
    if any(manifest[key] != value for key, value in asked.items()):
        raise StatsError(f"{source} holds statistics over {_describe(manifest)}; these edits ask for "
                         f"{_describe(asked)}: give the same corpus and token count (stats_corpus, stats_tokens), "
                         "or leave stats_source unset to compute them here")
    return {layer: (_read_layer(folder, source, layer, held[str(layer)], model.get_submodule(name)),
                    held[str(layer)]["tokens_seen"]) for layer, name in names.items()}


def _describe(identity: dict) -> str:
    return f"{identity['n_tokens']} tokens of corpus {identity['corpus']} (max_length {identity['max_length']})"


def _read_manifest(folder: Path, source) -> dict:
    path = folder / STATS_MANIFEST
    if not path.is_file():
        raise StatsError(f"{source} holds no {STATS_MANIFEST}: it is not a statistics folder that push_stats wrote")
    manifest = read_manifest(path, StatsError)
    if "format_version" not in manifest:
        raise StatsError(f"{source}: {STATS_MANIFEST} is not a JSON object with a format_version: it is not a "
                         "manifest that push_stats wrote")
    if manifest["format_version"] != STATS_FORMAT_VERSION:
        raise StatsError(f"{source}: {STATS_MANIFEST} has format_version {manifest['format_version']!r}; this "
                         f"hf_kedit reads version {STATS_FORMAT_VERSION} (a newer one needs a newer hf_kedit)")
    base_model = manifest.get("base_model")
    fingerprint = base_model.get("fingerprint") if isinstance(base_model, dict) else None
    layers = manifest.get("layers")
    well_formed = (isinstance(manifest.get("corpus"), str) and type(manifest.get("n_tokens")) is int
                   and type(manifest.get("max_length")) is int and isinstance(fingerprint, dict)
                   and all(isinstance(v, dict) for v in fingerprint.values()) and isinstance(layers, dict)
                   and all(k.isdigit() and isinstance(v, dict) and isinstance(v.get("module"), str)
                           and isinstance(v.get("sha256"), str) and type(v.get("tokens_seen")) is int
                           for k, v in layers.items()))
    if not well_formed:
        raise StatsError(f"{source}: {STATS_MANIFEST} must hold corpus (string), n_tokens and max_length (ints), "
                         "base_model.fingerprint (an object per module) and layers (per layer index: module, "
                         "sha256, tokens_seen); push the statistics again")
    return manifest


def _read_layer(folder: Path, source, layer: int, entry: dict, module) -> torch.Tensor:
    path = folder / stats_file(layer)
    C = read_listed_safetensors(path, entry["sha256"], source, StatsError, "push the statistics again").get(
        "second_moment")
    d = linear_shape(module)[1]
    if C is None or C.dtype != torch.float32 or list(C.shape) != [d, d]:
        found = "no 'second_moment'" if C is None else f"{C.dtype} {list(C.shape)}"
        raise StatsError(f"{source}: {path.name} must hold 'second_moment', float32 [{d}, {d}] for "
                         f"{entry['module']}; it holds {found}")
    if not torch.isfinite(C).all():
        raise StatsError(f"{source}: {path.name} holds NaN or inf values; compute the statistics again")
    return C


def _cache_key(fingerprint: dict, module: str, corpus: str, n_tokens: int, max_length: int) -> str:
    identity = [fingerprint["fingerprint"][module]["sha256_bf16"], fingerprint["model_type"], module, corpus,
                n_tokens, max_length]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def _save(path: Path, C: torch.Tensor, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes that computed the same C each write their own
    save_file({"second_moment": C}, str(tmp), metadata={"format": "pt", **metadata})
    os.replace(tmp, path)  # atomic: a reader never sees half a file


@torch.no_grad()
def _accumulate(model, tokenizer, modules: dict, texts, n_tokens, max_length, batch_size,
                progress) -> dict[int, tuple[torch.Tensor, int]]:
    """Per layer, C over the first `n_tokens` non-pad tokens (fewer if the texts run
    out) and that count. Launched in several processes (`accelerate launch`,
    torchrun), each reads every N-th batch and the sums are added across them: the
    same C as one process up to the order of the additions."""
    state = process_state()
    batches = _token_batches(tokenizer, texts, n_tokens, max_length, batch_size)
    mine = batches[state.process_index::state.num_processes]
    totals, captured = {}, {}
    handles = [m.register_forward_pre_hook(lambda mod, args, layer=layer: captured.__setitem__(layer, args[0]))
               for layer, m in modules.items()]
    layers = ("layer " if len(modules) == 1 else "layers ") + ", ".join(map(str, modules))
    bar = tqdm(total=sum(take for _, take in mine), unit="tok", desc=f"key statistics: reading keys ({layers})",
               disable=not progress or not state.is_main_process)
    try:
        for rows, take in mine:
            ids, mask = padded(rows, pad_id(tokenizer), input_device(model))
            run_until(model, modules.values(), input_ids=ids, attention_mask=mask)
            for layer, k in captured.items():
                keys = k[mask.bool()].float()[:take]
                totals[layer] = keys.T @ keys + totals.get(layer, 0)
            bar.update(take)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    count = sum(take for _, take in batches)
    if state.num_processes > 1:
        for layer, m in modules.items():
            d = linear_shape(m)[1]
            own = totals.get(layer, torch.zeros(d, d, device=execution_device(model, _name_of(model, m))))
            totals[layer] = reduce(own, "sum")
    return {layer: ((total / count).cpu(), count) for layer, total in totals.items()}


def _token_batches(tokenizer, texts, n_tokens, max_length, batch_size) -> list[tuple[list[list[int]], int]]:
    """The batches of token rows the statistics read, each with how many of its
    non-pad tokens count (all but in the last, which reaches `n_tokens`)."""
    batches, count = [], 0
    for start in range(0, len(texts), batch_size):
        if count >= n_tokens:
            break
        rows = [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts[start:start + batch_size]]
        take = min(sum(map(len, rows)), n_tokens - count)
        batches.append((rows, take))
        count += take
    return batches


def _name_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def corpus_name(corpus) -> str:
    """How a pack's hyperparameters name the statistics' corpus (never the texts themselves)."""
    return "self-sampled" if corpus is None else str(corpus) if isinstance(corpus, (str, os.PathLike)) \
        else type(corpus).__name__


def _corpus_id(corpus, max_length: int) -> str:
    """A name for the corpus in the cache key."""
    if corpus is None:
        return f"self-sampled:{max_length}"
    return "sha256:" + hashlib.sha256("\x00".join(_corpus_texts(corpus)).encode()).hexdigest()


def _corpus_texts(corpus) -> list[str]:
    if isinstance(corpus, (str, os.PathLike)):
        return [p for p in Path(corpus).read_text().split("\n\n") if p.strip()]
    if hasattr(corpus, "column_names"):  # a datasets.Dataset
        return list(corpus["text"])
    return list(corpus)
