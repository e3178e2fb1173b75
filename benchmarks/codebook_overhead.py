"""Cost of large codebooks on the default model: generation tokens/s with none and
with 1,000 and 10,000 GRACE-sized entries at the default layer, the prompt
outside every entry and inside one, and the time to load the largest pack.
Keys are random with the spread of real keys (their per-dimension standard
deviation, measured on the prompt), so every query is compared with every
entry as it would be. Prints a Markdown table; writes results.json, results.md
and tokens_per_s.png into --out.

    python benchmarks/codebook_overhead.py --out docs/bench/codebook-overhead
"""
from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from attach_overhead import (PROMPT, folder_bytes, generation_rows, generation_table, plot_tokens_per_s,
                             tokens_per_second)
from hf_kedit import Edit, EditPack, load_edits, remove_edits
from hf_kedit.anatomy import anatomy_of
from hf_kedit.kinds.codebook import Memory
from hf_kedit.methods.builders import codebook_pack
from hf_kedit.methods.memory.grace import GRACEConfig, projection_at
from hf_kedit.methods.requests import resolve_layer

from bench_setup import arguments, prepared, write_results


def random_codebook(model, layer, prompt_key, value, n, with_prompt, seed=0):
    """`n` entries of radius GRACE's default; the first one at the prompt's own key if `with_prompt`."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, prompt_key.numel(), generator=g) * prompt_key.std()
    if with_prompt:
        keys[0] = prompt_key
    edits = [Edit(f"e{i}", f"S{i}", "The capital of {} is", f"T{i}", "Old") for i in range(n)]
    entries = {e.id: (keys[i], value, GRACEConfig().radius) for i, e in enumerate(edits)}
    return codebook_pack(model, "random", {}, edits, layer, entries)


def search_seconds(search, query, calls=500):
    """Seconds `search` takes for one generated token's query (the prompt's key)."""
    query = query.reshape(1, -1).float()
    with torch.inference_mode():
        search(query)
        start = time.perf_counter()
        for _ in range(calls):
            search(query)
    return (time.perf_counter() - start) / calls


def full_search(memory):
    """The search without the index, for comparison: one product of the query with
    every key finds the nearest, whose distance is then taken directly."""
    keys, norms = memory.keys, memory.keys.pow(2).sum(1)

    def search(query):
        best = (norms - 2 * query @ keys.T).argmin(1)
        distance = (query - keys[best]).norm(dim=1)
        return torch.where(distance <= memory.radii[best], best, -1)
    return search


def main():
    parser = arguments(__doc__, out="docs/bench/codebook-overhead")
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model, tokenizer, out = prepared(args)
    anatomy = anatomy_of(model)
    layer = resolve_layer(GRACEConfig().layer, anatomy.num_layers)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    key, value = projection_at(model, model.get_submodule(anatomy.mlp_out(layer)), ids, ids.shape[1] - 1)
    sizes = [int(n) for n in args.sizes.split(",")]
    packs = {f"{n} entries, prompt {where}": random_codebook(model, layer, key, value, n, where == "in one entry")
             for n in sizes for where in ("in no entry", "in one entry")}

    tokens_per_second(model, tokenizer, 4)  # warm-up
    speeds = {"base model": [], **{name: [] for name in packs}}
    # Interleave conditions within each repeat so drift on a shared machine hits all alike.
    for _ in tqdm(range(args.repeats), desc="repeats"):
        speeds["base model"].append(tokens_per_second(model, tokenizer, args.new_tokens))
        for name, pack in packs.items():
            load_edits(model, pack, name="bench")
            speeds[name].append(tokens_per_second(model, tokenizer, args.new_tokens))
            remove_edits(model, "bench")
    rows = generation_rows(speeds)
    base_token_s = 1 / statistics.median(speeds["base model"])
    for row in rows:
        if row["condition"] in packs:
            memory = Memory.of(packs[row["condition"]])
            assert torch.equal(memory.index.nearest(key.reshape(1, -1)), full_search(memory)(key.reshape(1, -1)))
            for name, search in (("search", memory.index.nearest), ("full_search", full_search(memory))):
                row[f"{name}_us_per_token"] = search_seconds(search, key) * 1e6
                row[f"{name}_share_of_base_token"] = row[f"{name}_us_per_token"] * 1e-6 / base_token_s

    largest = packs[f"{max(sizes)} entries, prompt in no entry"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = largest.save_pretrained(Path(tmp) / "pack")
        load_times = []
        for _ in range(3):
            start = time.perf_counter()
            load_edits(model, EditPack.from_pretrained(folder), name="loaded")
            load_times.append(time.perf_counter() - start)
            remove_edits(model, "loaded")
        pack_bytes = folder_bytes(folder)
    results = {"model": args.model, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
               "torch": torch.__version__, "layer": layer, "new_tokens": args.new_tokens, "repeats": args.repeats,
               "generation": rows, "pack": {"entries": max(sizes), "bytes": pack_bytes,
                                            "bytes_per_entry": pack_bytes / max(sizes),
                                            "load_s_median": statistics.median(load_times), "load_runs": load_times}}
    table = generation_table(rows)
    table += ["", "| condition | search per generated token (share of a base token) | without the index |",
              "|---|---|---|"]
    table += [f"| {r['condition']} | {r['search_us_per_token']:.0f} µs ({100 * r['search_share_of_base_token']:.2f} %) "
              f"| {r['full_search_us_per_token']:.0f} µs ({100 * r['full_search_share_of_base_token']:.2f} %) |"
              for r in rows if r["condition"] in packs]
    table += ["", "| pack | value |", "|---|---|",
              f"| {max(sizes)}-entry pack folder | {pack_bytes / 1e6:.1f} MB ({pack_bytes / max(sizes):.0f} B/entry) |",
              f"| read, validate and attach (median of 3) | {statistics.median(load_times):.2f} s |"]
    write_results(out, "\n".join(table), results)
    plot_tokens_per_s(rows, out / "tokens_per_s.png", reference=0.90)


if __name__ == "__main__":
    main()
