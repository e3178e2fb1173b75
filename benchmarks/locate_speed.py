"""How fast the locate-and-edit methods are on this machine, model load and
scoring excluded: the key statistics from an empty cache (ROME's layer, then
MEMIT's layers) and the context templates (both once per model), seconds per
ROME and STEAM edit (one call per edit, median and spread), and one MEMIT
batch (--memit-batch 0: none). ROME, STEAM and ROME with EasyEdit's settings
for Llama models ("rome, EasyEdit's settings": 20 context templates, 10 of 5
tokens and 10 of 10, up to 25 steps, the value loss through the head's logits,
no key statistics) take turns edit by edit, in the same process, on the same
CounterFact cases, so the ratio between the last and ROME is measured in one
run. Then the same ROME edits in one call (their v* optimised `batch_size` at
a time), --together-runs times: seconds per edit as the call's time over its
edits, a throughput figure beside the per-call median. Prints a Markdown table; writes results.json, results.md and speed.png
into --out.

    python benchmarks/locate_speed.py --edits 20 --memit-batch 100 --out docs/bench/locate-speed
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import matplotlib
from tqdm.auto import tqdm

from hf_kedit.anatomy import anatomy_of
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.methods.locate.core import context_templates
from hf_kedit.methods.locate.memit import MEMITConfig, memit_edit
from hf_kedit.methods.locate.rome import ROMEConfig, rome_edit
from hf_kedit.methods.requests import edit_layers, resolve_layer
from hf_kedit.methods.locate.steam import STEAMConfig, steam_edit
from hf_kedit.methods.locate.stats import key_second_moments

from bench_setup import arguments, prepared, write_results

EASY = "rome, EasyEdit's settings"

EASYEDIT_ROME_SECONDS = 16.7  # EasyEdit's own ROME code on the default model on this machine (the figure)
# EasyEdit's hparams/ROME/llama-7b.yaml: context_template_length_params [[5, 10], [10, 10]] (tokens, how
# many), v_num_grad_steps 25, v_lr 0.5, v_weight_decay 1e-3, kl_factor 0.0625, mom2_adjustment false.
EASYEDIT = ROMEConfig(context_templates=((10, 5), (10, 10)), steps=25, lr=0.5, weight_decay=1e-3,
                      kl_factor=0.0625, head_loss=False, covariance=False)


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--data", default="../shared/data/counterfact.json")
    p.add_argument("--fact-base", default="../shared/data/factbase_counterfact_true.json")
    p.add_argument("--edits", type=int, default=20, help="edits timed per method, one call each")
    p.add_argument("--memit-batch", type=int, default=100, help="0: no MEMIT batch")
    p.add_argument("--together-runs", type=int, default=3, help="calls of all --edits ROME edits at once (0: none)")
    args = p.parse_args()
    model, tokenizer, out = prepared(args)
    edits = [c.edits[0] for c in read_cases("counterfact", args.data, limit=max(args.edits, args.memit_batch))]
    num_layers = anatomy_of(model).num_layers
    rome_layer = resolve_layer(ROMEConfig().layer, num_layers)
    memit_layers = edit_layers(MEMITConfig().layers, num_layers)
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["HF_KEDIT_CACHE"] = cache  # statistics from scratch; the edits below then read them
        results["statistics, ROME's layer (s)"] = timed(lambda: key_second_moments(model, tokenizer, [rome_layer]))
        results["statistics, MEMIT's other layers (s)"] = timed(
            lambda: key_second_moments(model, tokenizer, memit_layers))
        results["context templates, once per model (s)"] = timed(
            lambda: context_templates(model, tokenizer, ROMEConfig().context_templates))
        context_templates(model, tokenizer, EASYEDIT.context_templates)
        steam = STEAMConfig(fact_base=args.fact_base)
        per_edit = {"rome": [], "steam": [], EASY: []}
        for edit in tqdm(edits[:args.edits], desc="rome, steam and rome with EasyEdit's settings"):
            per_edit["rome"].append(timed(lambda: rome_edit(model, tokenizer, [edit], progress=False)))
            per_edit["steam"].append(timed(lambda: steam_edit(model, tokenizer, [edit], steam, progress=False)))
            per_edit[EASY].append(timed(lambda: rome_edit(model, tokenizer, [edit], EASYEDIT, progress=False)))
        together = [timed(lambda: rome_edit(model, tokenizer, edits[:args.edits], progress=False)) / args.edits
                    for _ in range(args.together_runs)]
        if args.memit_batch:
            results[f"memit, s for a batch of {args.memit_batch}"] = timed(
                lambda: memit_edit(model, tokenizer, edits[:args.memit_batch]))

    for method, seconds in per_edit.items():
        results[f"{method}, s per edit (median)"] = statistics.median(seconds)
        results[f"{method}, s per edit (min-max)"] = (min(seconds), max(seconds))
    if together:
        results[f"rome, {args.edits} edits in one call, s per edit (median of {len(together)} calls)"] = \
            statistics.median(together)
    speedup = EASYEDIT_ROME_SECONDS / results["rome, s per edit (median)"]
    results[f"{EASY} / rome (median of per-edit ratios)"] = statistics.median(
        b / r for b, r in zip(per_edit[EASY], per_edit["rome"]))
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {name} | " + ("–".join(f"{v:.2f}" for v in value) if isinstance(value, tuple) else f"{value:.2f}")
              + " |" for name, value in results.items()]
    memit = f"; MEMIT edits the first {args.memit_batch}" if args.memit_batch else ""
    table = "\n".join(lines) + (f"\n\nROME: {speedup:.1f}× faster than EasyEdit's own code's {EASYEDIT_ROME_SECONDS} s "
                                f"per edit on this machine (measured once, outside this run). ROME, STEAM and ROME "
                                f"with EasyEdit's settings take turns edit by edit, on the first {args.edits} "
                                f"CounterFact cases{memit}." + (
                                    f" All {args.edits} ROME edits in one call: "
                                    f"{EASYEDIT_ROME_SECONDS / statistics.median(together):.1f}× per edit."
                                    if together else "") + "\n")
    write_results(out, table, {"edits": args.edits, "memit_batch": args.memit_batch, "per_edit_seconds": per_edit,
                               "together_seconds_per_edit": together,
                               "summary": results, "speedup_over_easyedit_rome": speedup})
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.boxplot(list(per_edit.values()), tick_labels=list(per_edit))
    ax.axhline(EASYEDIT_ROME_SECONDS, color="grey", linestyle=":", label="EasyEdit's own ROME code (median)")
    ax.axhline(EASYEDIT_ROME_SECONDS / 10, color="grey", linestyle="--", label="10× faster")
    ax.set_ylabel("seconds per edit")
    ax.set_ylim(0, EASYEDIT_ROME_SECONDS * 1.1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)


if __name__ == "__main__":
    main()
