"""Cost of attached packs on the default model: generation tokens/s with 0, 1, 10
and 100 single-edit packs (hooked and merged), pack bytes per edit, and the load
time of a 1,000-edit pack. Prints a Markdown table; writes results.json,
results.md and tokens_per_s.png into --out.

    python benchmarks/attach_overhead.py --out docs/benchmarks
"""
from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_kedit import Edit, EditPack, load_edits, remove_edits, stack_of
from hf_kedit.anatomy import anatomy_of, linear_shape
from hf_kedit.methods.builders import weight_delta_pack

from bench_setup import arguments, prepared, write_results

PROMPT = "The mother tongue of Danielle Darrieux is"


def single_edit_packs(model, n, layers, seed=0):
    """`n` one-edit rank-one packs, cycling over `layers` (values are random: speed does not depend on them)."""
    anatomy, g = anatomy_of(model), torch.Generator().manual_seed(seed)
    packs = []
    for i in range(n):
        module = anatomy.mlp_out(layers[i % len(layers)])
        out_f, in_f = linear_shape(model.get_submodule(module))
        edit = Edit(f"e{i}", f"Subject {i}", "The home town of {} is", f"Town {i}", "Old")
        factors = {edit.id: {module: (torch.randn(1, in_f, generator=g) * 1e-3, torch.randn(out_f, 1, generator=g))}}
        packs.append(weight_delta_pack(model, "random", {}, [edit], factors))
    return packs


def tokens_per_second(model, tokenizer, new_tokens):
    ids = tokenizer(PROMPT, return_tensors="pt")
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
    return new_tokens / (time.perf_counter() - start)


def hook_microseconds_per_token(model, calls=2000):
    """Time spent in the attached hooks for one decoded token, timed directly on
    decode-shaped inputs: the generation medians are too noisy to see it."""
    total = 0.0
    for module in model.modules():
        for hook in module._forward_hooks.values():
            out_f, in_f = linear_shape(module)
            x, y = torch.randn(1, 1, in_f), torch.randn(1, 1, out_f)
            with torch.inference_mode():
                hook(module, (x,), y)
                start = time.perf_counter()
                for _ in range(calls):
                    hook(module, (x,), y)
                total += (time.perf_counter() - start) / calls
    return total * 1e6


def attached(model, packs, merge):
    for i, pack in enumerate(packs):
        load_edits(model, pack, name=f"p{i}", merge=merge)


def detach_all(model):
    for attached_pack in stack_of(model).list():
        remove_edits(model, attached_pack.name)


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir())


def main():
    parser = arguments(__doc__, out="docs/benchmarks")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model, tokenizer, out = prepared(args)
    n_layers = anatomy_of(model).num_layers
    one_layer, ten_layers = [n_layers // 6], list(range(n_layers // 6, n_layers // 6 + 10))
    conditions = [("base model", 0, one_layer, False)]
    for n in (1, 10, 100):
        conditions += [(f"{n} packs, hooked, one layer", n, one_layer, False),
                       (f"{n} packs, hooked, 10 layers", n, ten_layers, False),
                       (f"{n} packs, merged, 10 layers", n, ten_layers, True)]
    all_packs = {tuple(layers): single_edit_packs(model, 100, layers) for layers in (one_layer, ten_layers)}

    tokens_per_second(model, tokenizer, 4)  # warm-up
    speeds = {name: [] for name, *_ in conditions}
    hook_us = {}
    # Interleave conditions within each repeat so drift on a shared machine hits all alike.
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for name, n, layers, merge in conditions:
            attached(model, all_packs[tuple(layers)][:n], merge)
            speeds[name].append(tokens_per_second(model, tokenizer, args.new_tokens))
            if name not in hook_us:
                hook_us[name] = hook_microseconds_per_token(model)
            detach_all(model)
    rows = generation_rows(speeds, hook_us)

    big = single_edit_packs(model, 1000, one_layer)
    thousand = EditPack(big[0].kind, "random", [e for p in big for e in p.edits],
                        {k: t for p in big for k, t in p.tensors.items()}, big[0].base_model, {}, big[0].kind_config)
    with tempfile.TemporaryDirectory() as tmp:
        big[0].save_pretrained(Path(tmp) / "one")
        thousand.save_pretrained(Path(tmp) / "thousand")
        one_bytes = folder_bytes(Path(tmp) / "one")
        thousand_bytes = folder_bytes(Path(tmp) / "thousand")
        read_times, attach_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            EditPack.from_pretrained(Path(tmp) / "thousand")
            read_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_edits(model, Path(tmp) / "thousand", name="thousand")
            attach_times.append(time.perf_counter() - start)
            remove_edits(model, "thousand")

    results = {
        "model": args.model, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "generation": rows,
        "pack_bytes_per_edit": {"one_edit_pack_folder": one_bytes, "thousand_edit_pack_folder": thousand_bytes / 1000,
                                "tensor_bytes": big[0].nbytes},
        "thousand_edit_pack": {"read_and_validate_s_median": statistics.median(read_times),
                               "load_edits_s_median": statistics.median(attach_times),
                               "read_runs": read_times, "load_edits_runs": attach_times},
    }
    table = generation_table(rows)
    table += ["", "| pack | value |", "|---|---|",
              f"| bytes per edit, one-edit pack folder (tensors + manifest + card) | {one_bytes} |",
              f"| bytes per edit, 1,000-edit pack folder | {thousand_bytes / 1000:.0f} |",
              f"| tensor bytes per rank-one edit (fp32) | {big[0].nbytes} |",
              f"| 1,000-edit pack: read + validate (median) | {statistics.median(read_times):.3f} s |",
              f"| 1,000-edit pack: load_edits onto the model (median) | {statistics.median(attach_times):.3f} s |"]
    write_results(out, "\n".join(table), results)
    plot_tokens_per_s(rows, out / "tokens_per_s.png")


def generation_rows(speeds: dict[str, list[float]], hook_us: dict[str, float] | None = None) -> list[dict]:
    """Per condition: its tokens/s runs summarised against the "base model" condition's,
    and, given `hook_us`, its time in hooks per token."""
    base = statistics.median(speeds["base model"])
    # run i of every condition comes from the same repeat, so its ratio to base run i cancels the drift
    # of a shared machine that the ratio of medians keeps
    paired = {name: [a / b for a, b in zip(v, speeds["base model"])] for name, v in speeds.items()}
    rows = [{"condition": name, "tokens_per_s_median": statistics.median(v), "tokens_per_s_iqr": quartiles(v),
             "runs": v, "relative_to_base": statistics.median(v) / base,
             "paired_relative_median": statistics.median(paired[name]), "paired_relative_iqr": quartiles(paired[name])}
            for name, v in speeds.items()]
    for row in rows if hook_us is not None else ():
        row["hook_us_per_token"] = hook_us[row["condition"]]
        row["hook_share_of_base_token_time"] = row["hook_us_per_token"] * 1e-6 * base
    return rows


def generation_table(rows: list[dict]) -> list[str]:
    """The Markdown lines of `generation_rows` (with the hook columns where the rows have them)."""
    hooks = "hook_us_per_token" in rows[0]
    table = ["| condition | tokens/s, median (p25-p75) | vs base | vs base, paired by repeat (p25-p75) |"
             + (" time in hooks per token | share of a base token |" if hooks else ""),
             "|---|---|---|---|" + ("---|---|" if hooks else "")]
    return table + [f"| {r['condition']} | {r['tokens_per_s_median']:.1f} ({r['tokens_per_s_iqr'][0]:.1f}-"
                    f"{r['tokens_per_s_iqr'][1]:.1f}) | {100 * r['relative_to_base']:.1f} % | "
                    f"{100 * r['paired_relative_median']:.1f} % ({100 * r['paired_relative_iqr'][0]:.1f}-"
                    f"{100 * r['paired_relative_iqr'][1]:.1f}) |"
                    + (f" {r['hook_us_per_token']:.0f} µs | {100 * r['hook_share_of_base_token_time']:.2f} % |"
                       if hooks else "")
                    for r in rows]


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def plot_tokens_per_s(rows, path, reference=0.95):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["condition"] for r in rows]
    ax.barh(names[::-1], [r["tokens_per_s_median"] for r in rows][::-1], color="tab:blue")
    ax.axvline(rows[0]["tokens_per_s_median"] * reference, color="tab:red", linestyle="--",
               label=f"{100 * reference:.0f} % of base")
    ax.set_xlabel("generation tokens/s (median)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
