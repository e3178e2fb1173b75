"""Cost of singular_scale (SVF) packs on the default model: generation tokens/s and
time in hooks per token with one SVF edit on one projection and on the 25 the
method's default band covers, hooked and merged, beside a rank-one weight_delta
edit on the same projections; bytes per edit on disk; the attach time (one SVD
per weight). Prints a Markdown table; writes results.json, results.md and
tokens_per_s.png into --out.

    python benchmarks/svf_cost.py --out docs/bench/svf-cost
"""
from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_kedit import Edit, load_edits, remove_edits
from hf_kedit.anatomy import anatomy_of
from hf_kedit.kinds.singular_scale import singular_decomposition, weight_matrix
from hf_kedit.methods.builders import singular_scale_pack, weight_delta_pack
from hf_kedit.methods.requests import edit_layers

from attach_overhead import (folder_bytes, generation_rows, generation_table, hook_microseconds_per_token,
                             plot_tokens_per_s, tokens_per_second)
from bench_setup import arguments, prepared, write_results

EDIT = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")


def svf_pack(model, modules, g):
    """One edit's z (random around 1: speed does not depend on the values) on `modules`."""
    spectra = {m: singular_decomposition(weight_matrix(model.get_submodule(m), model.get_submodule(m).weight))[1]
               for m in modules}
    zs = {EDIT.id: {m: 1 + 0.01 * torch.randn(len(S), generator=g) for m, S in spectra.items()}}
    return singular_scale_pack(model, "random", {}, [EDIT], zs, spectra)


def rank_one_pack(model, modules, g):
    factors = {EDIT.id: {m: (torch.randn(1, model.get_submodule(m).in_features, generator=g) * 1e-3,
                             torch.randn(model.get_submodule(m).out_features, 1, generator=g)) for m in modules}}
    return weight_delta_pack(model, "random", {}, [EDIT], factors)


def main():
    parser = arguments(__doc__, out="docs/bench/svf-cost")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model, tokenizer, out = prepared(args)
    anatomy, g = anatomy_of(model), torch.Generator().manual_seed(0)
    band = [anatomy.mlp_out(i) for i in edit_layers((0.0, 0.8), anatomy.num_layers)]
    packs = {"svf, 1 projection": svf_pack(model, band[:1], g), f"svf, {len(band)} projections": svf_pack(model, band, g),
             "rank-one weight_delta, 1 projection": rank_one_pack(model, band[:1], g),
             f"rank-one weight_delta, {len(band)} projections": rank_one_pack(model, band, g)}
    conditions = [("base model", None, False)] + [(f"{name}, {how}", name, how == "merged")
                                                  for name in packs for how in ("hooked", "merged")]
    tokens_per_second(model, tokenizer, 4)  # warm-up
    speeds, hook_us, attach_s = {c: [] for c, *_ in conditions}, {}, {name: [] for name in packs}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for condition, name, merge in conditions:  # interleaved: drift hits every condition alike
            if name is not None:
                start = time.perf_counter()
                load_edits(model, packs[name], name="p", merge=merge)
                if not merge:
                    attach_s[name].append(time.perf_counter() - start)
            speeds[condition].append(tokens_per_second(model, tokenizer, args.new_tokens))
            hook_us.setdefault(condition, hook_microseconds_per_token(model))
            if name is not None:
                remove_edits(model, "p")
    rows = generation_rows(speeds, hook_us)
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pack in packs.items():
            sizes[name] = {"folder_bytes": folder_bytes(pack.save_pretrained(Path(tmp) / name.replace(" ", "_"))),
                           "tensor_bytes": pack.nbytes, "params": sum(t.numel() for t in pack.tensors.values())}
    results = {"model": args.model, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
               "torch": torch.__version__, "new_tokens": args.new_tokens, "repeats": args.repeats,
               "generation": rows, "pack": sizes,
               "attach_s_median": {n: statistics.median(v) for n, v in attach_s.items()}}
    table = generation_table(rows)
    table += ["", "| pack (one edit) | params | tensor bytes | folder bytes | attach, hooked (median) |",
              "|---|---|---|---|---|"]
    table += [f"| {n} | {s['params']} | {s['tensor_bytes']} | {s['folder_bytes']} | "
              f"{results['attach_s_median'][n]:.3f} s |" for n, s in sizes.items()]
    write_results(out, "\n".join(table), results)
    plot_tokens_per_s(rows, out / "tokens_per_s.png")


if __name__ == "__main__":
    main()
