"""Cost of 1,000 attached steering edits on the default model: generation tokens/s
with none and with 1,000 SAKE-sized edits behind each router (final-norm state,
the subject gate, a sentence-embedding router), with the prompt outside every
scope and inside one, and the time to load a 1,000-edit pack. Prints a Markdown
table; writes results.json, results.md and tokens_per_s.png into --out.

    python benchmarks/steering_overhead.py --out docs/bench/steering-overhead
"""
from __future__ import annotations

import importlib.util
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
from hf_kedit.kinds.prompt_calls import hidden_size
from hf_kedit.kinds.sentence_embedding import EMBEDDING_MODELS
from hf_kedit.kinds.steering_map import SteeringMapConfig
from hf_kedit.methods.builders import steering_map_pack
from hf_kedit.methods.steering.core import router_representations

from bench_setup import arguments, prepared, write_results

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def thousand_edit_pack(model, tokenizer, config: SteeringMapConfig, n: int, rank: int, in_scope: bool, seed=0):
    """`n` edits with random maps of rank `rank` (the values do not change the cost); random
    centroids, except edit 0's, which is PROMPT's own representation when `in_scope`.
    The subjects are distinct names; edit 0's is in PROMPT."""
    g = torch.Generator().manual_seed(seed)
    d = hidden_size(model)
    centroids = torch.nn.functional.normalize(torch.randn(n, config.scope_size, generator=g), dim=-1)
    if in_scope:
        centroids[0] = router_representations(model, tokenizer, config, [PROMPT])[0]
    edits, parts = [], {}
    for i in range(n):
        subject = "Danielle Darrieux" if i == 0 else f"Person {i}"
        edits.append(Edit(f"e{i}", subject, "The mother tongue of {} is", f"Language {i}", "French"))
        parts[f"e{i}"] = {"map.basis": torch.linalg.qr(torch.randn(d, rank, generator=g)).Q,
                          "map.core": torch.randn(rank, rank, generator=g) * 0.1,
                          "map.bias": torch.randn(d, generator=g) * 0.1,
                          "scope.centroid": centroids[i], "scope.threshold": torch.tensor([0.05])}
    return steering_map_pack(model, "random", {"seed": seed}, edits, config, parts)


def main():
    parser = arguments(__doc__, out="docs/bench/steering-overhead")
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=28, help="map rank (a template-paraphrase SAKE edit's)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model, tokenizer, out = prepared(args)
    d = hidden_size(model)
    routers = {"final-norm router": SteeringMapConfig(hidden_size=d, scope_size=d),
               "final-norm router + subject gate": SteeringMapConfig(hidden_size=d, scope_size=d, subject_gate=True)}
    if importlib.util.find_spec(EMBEDDING_MODELS[MINILM][1]):
        routers["sentence-embedding router"] = SteeringMapConfig(
            hidden_size=d, representation="sentence_embedding", embedding_model=MINILM,
            scope_size=EMBEDDING_MODELS[MINILM][2])
    packs = {f"{args.edits} edits, {router}, prompt {where}": thousand_edit_pack(
                 model, tokenizer, config, args.edits, args.rank, where == "in one scope")
             for router, config in routers.items() for where in ("in no scope", "in one scope")}

    tokens_per_second(model, tokenizer, 4)  # warm-up
    speeds = {"base model": [], **{name: [] for name in packs}}
    # Interleave conditions within each repeat so drift on a shared machine hits all alike.
    for _ in tqdm(range(args.repeats), desc="repeats"):
        speeds["base model"].append(tokens_per_second(model, tokenizer, args.new_tokens))
        for name, pack in packs.items():
            load_edits(model, pack, name="bench", tokenizer=tokenizer)
            speeds[name].append(tokens_per_second(model, tokenizer, args.new_tokens))
            remove_edits(model, "bench")
    rows = generation_rows(speeds)

    with tempfile.TemporaryDirectory() as tmp:
        folder = next(iter(packs.values())).save_pretrained(Path(tmp) / "pack")
        read_times, load_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            EditPack.from_pretrained(folder)
            read_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_edits(model, folder, name="loaded")
            load_times.append(time.perf_counter() - start)
            remove_edits(model, "loaded")
        pack_bytes = folder_bytes(folder)

    results = {
        "model": args.model, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "edits": args.edits, "map_rank": args.rank, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "generation": rows,
        "pack": {"bytes": pack_bytes, "bytes_per_edit": pack_bytes / args.edits,
                 "read_and_validate_s_median": statistics.median(read_times),
                 "load_edits_s_median": statistics.median(load_times), "read_runs": read_times,
                 "load_edits_runs": load_times},
    }
    table = generation_table(rows)
    table += ["", "| pack | value |", "|---|---|",
              f"| {args.edits}-edit pack folder | {pack_bytes / 1e6:.1f} MB ({pack_bytes / args.edits:.0f} B/edit) |",
              f"| read + validate (median) | {statistics.median(read_times):.3f} s |",
              f"| load_edits onto the model, read included (median) | {statistics.median(load_times):.3f} s |"]
    write_results(out, "\n".join(table), results)
    plot_tokens_per_s(rows, out / "tokens_per_s.png", reference=0.90)


if __name__ == "__main__":
    main()
