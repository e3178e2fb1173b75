"""What replaying the layers below the trained module saves in the training
loops (`fit_target(..., trained=...)`): seconds per edit of each --methods
method with the layers below its trained module run once per edit (as the
library does) and run at every step (the loop without `trained`), taking turns
edit by edit in one process on the same cases, with a check that both make
the same pack tensors. Prints a Markdown table; writes results.json and
results.md into --out.

    python benchmarks/replayed_layers.py --data ripple:../shared/data/rippleedits_popular.json --edits 3 \\
        --methods lora,reft,distill --out docs/bench/replayed-layers
"""
from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.methods import make_pack
from hf_kedit.methods import teacher_forcing

from bench_setup import arguments, prepared, write_results


def timed_pack(method: str, model, tokenizer, edit, replay: bool):
    """(seconds, pack) of one edit, with the layers below the trained module replayed or not."""
    own = teacher_forcing.layers_before
    if not replay:
        teacher_forcing.layers_before = lambda model, modules: []
    try:
        start = time.perf_counter()
        pack = make_pack(method, model, tokenizer, [edit], progress=False)
        return time.perf_counter() - start, pack
    finally:
        teacher_forcing.layers_before = own


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--data", required=True, help="FORMAT:PATH of a benchmark")
    p.add_argument("--edits", type=int, default=3, help="edits timed per method and variant (after one warm-up)")
    p.add_argument("--methods", default="lora,reft,distill")
    args = p.parse_args()
    model, tokenizer, out = prepared(args)
    fmt, path = args.data.split(":", 1)
    edits = [c.edits[0] for c in read_cases(fmt, path, limit=args.edits + 1)]
    results = {}
    for method in args.methods.split(","):
        make_pack(method, model, tokenizer, edits[:1], progress=False)  # warm-up: per-model caches
        seconds, same = {True: [], False: []}, []
        for edit in tqdm(edits[1:], desc=method, unit="edit"):
            packs = {}
            for replay in (True, False):
                s, packs[replay] = timed_pack(method, model, tokenizer, edit, replay)
                seconds[replay].append(s)
            same.append(all(torch.allclose(packs[True].tensors[k], packs[False].tensors[k], rtol=1e-4, atol=1e-6)
                            for k in packs[False].tensors))
        results[method] = {"replayed": seconds[True], "every_step": seconds[False], "same_tensors": same,
                           "ratio": statistics.median(seconds[True]) / statistics.median(seconds[False])}
    lines = ["| method | s/edit, layers below replayed (median) | s/edit, every layer every step | ratio | "
             "same pack tensors |", "|---|---|---|---|---|"]
    for method, r in results.items():
        lines.append(f"| {method} | {statistics.median(r['replayed']):.2f} | {statistics.median(r['every_step']):.2f}"
                     f" | {r['ratio']:.2f} | {sum(r['same_tensors'])}/{len(r['same_tensors'])} |")
    table = "\n".join(lines) + f"\n\n{args.edits} edits of {args.data} per method, the variants taking turns.\n"
    write_results(out, table, {"data": args.data, "edits": args.edits, "methods": results})


if __name__ == "__main__":
    main()
