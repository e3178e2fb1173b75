"""Time to attach 10,000 edits from disk on the default model, per kind, with
each method's per-edit size: a ROME-sized `weight_delta` edit (rank 1 on one
MLP output projection) as one 10,000-edit pack and as 100 packs of 100 (what a
sequential run leaves), a BaFT-sized `basis_intervention` edit (rank 4, gated),
a SAKE-sized `steering_map` edit (a rank-28 map and a centroid) and a
GRACE-sized `codebook` entry. The values are random: reading, checking and
attaching do not depend on them. Each time is the median of --repeats: the
folder read and checked (`EditPack.from_pretrained`), then attached
(`load_edits`), then the first forward call (work a kind defers to it, such
as fusing factors, counts; the base model's own forward time is subtracted),
then the packs are removed. Prints a Markdown table; writes results.json,
results.md and attach_seconds.png into --out.

    python benchmarks/attach_many.py --out docs/bench/attach-many
"""
from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from attach_overhead import PROMPT, folder_bytes
from codebook_overhead import random_codebook
from hf_kedit import Edit, EditPack, load_edits, remove_edits
from hf_kedit.anatomy import anatomy_of, linear_shape
from hf_kedit.kinds.basis_intervention import BasisInterventionConfig
from hf_kedit.kinds.prompt_calls import hidden_size
from hf_kedit.kinds.steering_map import SteeringMapConfig
from hf_kedit.methods.builders import basis_intervention_pack, weight_delta_pack
from hf_kedit.methods.memory.grace import GRACEConfig, projection_at
from hf_kedit.methods.requests import resolve_layer
from steering_overhead import thousand_edit_pack

from bench_setup import arguments, prepared, write_results

GOAL_S = 2.0


def edits_of(n: int, prefix: str) -> list[Edit]:
    return [Edit(f"{prefix}{i}", f"Person {prefix}{i}", "The mother tongue of {} is", f"Language {i}", "French")
            for i in range(n)]


def rome_sized(model, n: int, prefix: str, seed: int):
    """`n` rank-1 deltas of ROME's default layer's MLP output projection."""
    g = torch.Generator().manual_seed(seed)
    module = anatomy_of(model).mlp_out(5)
    out_f, in_f = linear_shape(model.get_submodule(module))
    edits = edits_of(n, prefix)
    factors = {e.id: {module: (torch.randn(1, in_f, generator=g), torch.randn(out_f, 1, generator=g) * 1e-3)}
               for e in edits}
    return weight_delta_pack(model, "random", {"seed": seed}, edits, factors)


def baft_sized(model, n: int, seed: int = 0):
    """`n` gated rank-4 interventions at BaFT's default layer."""
    g = torch.Generator().manual_seed(seed)
    d = hidden_size(model)
    edits = edits_of(n, "b")
    parts = {e.id: {12: {"rotation": torch.linalg.qr(torch.randn(d, 4, generator=g)).Q.T.contiguous(),
                         "source.weight": torch.randn(4, d, generator=g), "source.bias": torch.zeros(4),
                         "gate.weight": torch.randn(4, d, generator=g), "gate.bias": torch.full((4,), -20.0)}}
             for e in edits}
    config = BasisInterventionConfig(peft_type="BAFT", gate="sigmoid_rms", r=4, layers=[12], positions="all",
                                     hidden_size=d, gate_floor=0.5)
    return basis_intervention_pack(model, "random", {"seed": seed}, edits, config, parts)


def forward_seconds(model, ids) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids)
    return time.perf_counter() - start


def timed_attach(model, tokenizer, folders: list[Path], ids) -> tuple[float, float, float]:
    """Seconds to read and check every folder, to attach them all, and of the first
    forward call after (where work a kind defers to its first call is done); then
    removes them."""
    start = time.perf_counter()
    packs = [EditPack.from_pretrained(folder) for folder in folders]
    read = time.perf_counter() - start
    start = time.perf_counter()
    for i, pack in enumerate(packs):
        load_edits(model, pack, name=f"p{i}", tokenizer=tokenizer)
    attach = time.perf_counter() - start
    first = forward_seconds(model, ids)
    for i in range(len(packs)):
        remove_edits(model, f"p{i}")
    return read, attach, first


def main():
    parser = arguments(__doc__, out="docs/bench/attach-many")
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer, out = prepared(args)
    n = args.edits
    anatomy = anatomy_of(model)
    layer = resolve_layer(GRACEConfig().layer, anatomy.num_layers)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    key, value = projection_at(model, model.get_submodule(anatomy.mlp_out(layer)), ids, ids.shape[1] - 1)
    d = hidden_size(model)
    builds = {
        f"weight_delta (ROME-sized), one pack of {n}": lambda: [rome_sized(model, n, "w", 0)],
        f"weight_delta (ROME-sized), {n // 100} packs of 100": lambda: [rome_sized(model, 100, f"w{j}x", j)
                                                                     for j in range(n // 100)],
        f"basis_intervention (BaFT-sized), one pack of {n}": lambda: [baft_sized(model, n)],
        f"steering_map (SAKE-sized, subject gate), one pack of {n}": lambda: [thousand_edit_pack(
            model, tokenizer, SteeringMapConfig(hidden_size=d, scope_size=d, subject_gate=True), n, 28, False)],
        f"codebook (GRACE-sized), one pack of {n}": lambda: [random_codebook(model, layer, key, value, n, False)],
    }
    forward_seconds(model, ids)
    base_forward = statistics.median(forward_seconds(model, ids) for _ in range(9))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c, (name, build) in enumerate(tqdm(builds.items(), desc="kinds")):
            folders = [pack.save_pretrained(Path(tmp) / f"{c}-{j}") for j, pack in enumerate(build())]
            timed_attach(model, tokenizer, folders, ids)  # warm: the files in the page cache, as after a download
            runs = [timed_attach(model, tokenizer, folders, ids) for _ in range(args.repeats)]
            reads, attaches, firsts = ([run[i] for run in runs] for i in range(3))
            # what the user waits for before the first answer, beyond what the base model takes
            totals = [r + a + f - base_forward for r, a, f in runs]
            rows.append({"condition": name, "packs": len(folders), "edits": n,
                         "bytes": sum(folder_bytes(f) for f in folders),
                         "read_s_median": statistics.median(reads), "attach_s_median": statistics.median(attaches),
                         "first_forward_s_median": statistics.median(firsts),
                         "total_s_median": statistics.median(totals), "runs": runs})
    table = [f"| packs | MB (B per edit) | read and check, s | attach, s | first forward, s (base {base_forward:.2f}) "
             "| read + attach + first forward − base, s | goal < 2 s |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['condition']} | {r['bytes'] / 1e6:.1f} ({r['bytes'] / n:.0f}) | {r['read_s_median']:.2f} | "
              f"{r['attach_s_median']:.2f} | {r['first_forward_s_median']:.2f} | {r['total_s_median']:.2f} | "
              f"{'met' if r['total_s_median'] < GOAL_S else 'missed'} |" for r in rows]
    results = {"model": args.model, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
               "torch": torch.__version__, "edits": n, "repeats": args.repeats, "base_forward_s": base_forward,
               "rows": rows}
    write_results(out, "\n".join(table), results)
    plot(rows, out / "attach_seconds.png")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["condition"] for r in rows]
    ax.barh(names, [r["read_s_median"] for r in rows], label="read and check")
    ax.barh(names, [r["attach_s_median"] for r in rows], left=[r["read_s_median"] for r in rows], label="attach")
    ax.axvline(GOAL_S, color="k", linestyle=":", label="goal")
    ax.set_xlabel("seconds (median)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
