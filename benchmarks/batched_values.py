"""The value optimisation (ROME's compute_v, MEMIT's targets) one request at a
time against batches of requests optimised together: seconds per request and
how far each batched v* lies from the same request's v* alone (the largest
‖v*_batch − v*_alone‖ / ‖v*_alone − v‖ over the requests, v the unedited value),
at ROME's layer and at MEMIT's last layer, on the first --edits CounterFact
cases. Key statistics and context templates are read before the timing starts.
Prints a Markdown table; writes results.json, results.md and speed.png into --out.

    python benchmarks/batched_values.py --edits 64 --batch-sizes 1,8,16,32,64 --out docs/bench/batched-values
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from hf_kedit.anatomy import anatomy_of
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.methods.locate.core import context_templates, optimise_values
from hf_kedit.methods.locate.memit import MEMITConfig
from hf_kedit.methods.locate.rome import ROMEConfig
from hf_kedit.methods.requests import edit_layers, resolve_layer
from hf_kedit.progress import StepBar

from bench_setup import arguments, prepared, write_results


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--data", default="../shared/data/counterfact.json")
    p.add_argument("--edits", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8,16,32,64")
    args = p.parse_args()
    model, tokenizer, out = prepared(args)
    edits = [c.edits[0] for c in read_cases("counterfact", args.data, limit=args.edits)]
    anatomy = anatomy_of(model)
    sites = {"rome": (ROMEConfig(), model.get_submodule(anatomy.mlp_out(resolve_layer(ROMEConfig().layer,
                                                                                      anatomy.num_layers)))),
             "memit": (MEMITConfig(), model.get_submodule(anatomy.layer(edit_layers(MEMITConfig().layers,
                                                                                   anatomy.num_layers)[-1])))}
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    rows, results = [], {}
    for site, (config, module) in sites.items():
        templates = context_templates(model, tokenizer, config.context_templates)
        values = {}
        for size in sizes:
            bar = StepBar(edits, config.steps, f"{site}: batches of {size}")
            start = time.perf_counter()
            values[size] = [s for batch in bar.batches(size) for s in optimise_values(
                model, tokenizer, module, batch, templates, replace(config, batch_size=size), on_step=bar.step)]
            seconds = (time.perf_counter() - start) / len(edits)
            alone = values[sizes[0]]
            gap = max(((b.value - a.value).norm() / (a.value - a.current_value).norm()).item()
                      for a, b in zip(alone, values[size]))
            results[f"{site}, batch {size}"] = {"seconds_per_request": seconds, "largest_relative_gap": gap}
            speedup = results[f"{site}, batch {sizes[0]}"]["seconds_per_request"] / seconds
            rows.append(f"| {site} | {size} | {seconds:.2f} | {speedup:.2f}× | {gap:.1e} |")
    table = "\n".join(["| site | batch | s per request | speed-up | largest ‖Δv*‖ / ‖v* − v‖ against batch "
                       f"{sizes[0]} |", "|---|---|---|---|---|", *rows])
    table += (f"\n\nOn the first {args.edits} CounterFact cases, {torch.get_num_threads()} threads; one pass per "
              "batch size, in the order listed.\n")
    write_results(out, table, {"edits": args.edits, "threads": torch.get_num_threads(), "results": results})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for site in sites:
        ax.plot(sizes, [results[f"{site}, batch {s}"]["seconds_per_request"] for s in sizes], marker="o", label=site)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests optimised together")
    ax.set_ylabel("seconds per request")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)


if __name__ == "__main__":
    main()
