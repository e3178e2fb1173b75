"""Edit quality against the rank a pack is compacted to for serving: ROME edits
of the first N cases of --data as one pack (less the cases that give an
earlier case's subject and prompt another target), attached together, scored as
they are and with each weight's change compacted (truncated SVD,
`weight_delta.compacted`) to each rank of --ranks; the unedited model beside.
All N cases are scored, or a fixed sample of --score-sample of them (the same
cases in every row). The pack is saved in --out/pack; --reuse-pack scores it
again without editing. Prints a Markdown table; writes results.json, results.md
and compact_rank.png into --out.

    python benchmarks/compact_rank.py --cases 100 --ranks 64,32,16,8,4,1 --out docs/bench/compact-rank-100
    python benchmarks/compact_rank.py --data easyedit:../shared/data/counterfact_easyedit.json --cases 1000 \
        --score-sample 200 --ranks 512,256,128,64,16,1 --out docs/bench/compact-rank-1000
"""
from __future__ import annotations

import random

import torch

from hf_kedit import EditPack, load_edits, remove_edits
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.evaluate.harness import EvalConfig, aggregate, locality_references
from hf_kedit.evaluate.metrics import score_cases
from hf_kedit.evaluate.scoring import Scorer
from hf_kedit.kinds.weight_delta import compacted, deltas_applied, factors_by_module
from hf_kedit.methods.locate.rome import ROMEConfig, rome_edit

from bench_setup import arguments, plot_against, prepared, write_results

METRICS = ("efficacy", "locality")
SCORES = [(m, k) for m in METRICS for k in ("cmp", "tf", "gen")]


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--data", default="counterfact:../shared/data/counterfact.json", metavar="FORMAT:PATH")
    p.add_argument("--cases", type=int, default=100, help="the first N cases are edited")
    p.add_argument("--score-sample", type=int, default=None, help="score a fixed sample of this many of them")
    p.add_argument("--ranks", default="64,32,16,8,4,1")
    p.add_argument("--solve-at", default="templates", help="ROME's solve_at: many edits attached together "
                   "hold better with 'templates' (docs/locate-and-edit.md)")
    p.add_argument("--reuse-pack", action="store_true", help="score the pack an earlier run saved in --out/pack "
                   "instead of editing again")
    args = p.parse_args()
    model, tokenizer, out = prepared(args)
    config = EvalConfig(metrics=METRICS)
    data_format, _, path = args.data.partition(":")
    cases = read_cases(data_format, path, limit=args.cases)
    # One pack cannot hold two targets for one (subject, prompt): later cases that contradict an earlier one are
    # left out, so that every scored edit is in the pack (EasyEdit's CounterFact repeats some prompts).
    targets, dropped = {}, []
    for case in cases:
        keys = [((e.subject, e.prompt), e.target_new) for e in case.edits]
        if any(targets.get(key, target) != target for key, target in keys):
            dropped.append(case.id)
        else:
            targets.update(keys)
    cases = [c for c in cases if c.id not in set(dropped)]
    scored = cases
    if args.score_sample is not None and args.score_sample < len(cases):
        scored = [cases[i] for i in sorted(random.Random(0).sample(range(len(cases)), args.score_sample))]
    references = locality_references(model, tokenizer, scored, config)
    scorer = Scorer(model, tokenizer, batch_size=config.batch_size)
    selected = [config.select(c) for c in scored]

    def scores(desc):
        return aggregate(score_cases(scorer, selected, references, desc))

    saved = out / "pack"
    if args.reuse_pack and saved.exists():
        pack = EditPack.from_pretrained(saved)
        if [e.id for e in pack.edits] != [e.id for c in cases for e in c.edits]:
            raise SystemExit(f"{saved} holds other edits than these cases: remove it or leave out --reuse-pack")
    else:
        pack = rome_edit(model, tokenizer, [e for c in cases for e in c.edits], ROMEConfig(solve_at=args.solve_at))
        pack.save_pretrained(saved, overwrite=True)
    factors = factors_by_module(pack)
    full = max(A.shape[0] for A, _ in factors.values())
    rows = {"unedited": scores("unedited")}
    load_edits(model, pack, name="rome")
    rows[f"pack (rank {full})"] = scores("pack")
    remove_edits(model, "rome")
    ranks = [r for r in map(int, args.ranks.split(",")) if r < full]
    kept = {}
    for rank in ranks:
        small = compacted(factors, rank=rank)
        kept[rank] = {m: float(torch.linalg.matrix_norm((B @ A).double()) ** 2
                               / torch.linalg.matrix_norm((factors[m][1] @ factors[m][0]).double()) ** 2)
                      for m, (A, B) in small.items()}
        with deltas_applied(model, small):
            rows[f"compacted to rank {rank}"] = scores(f"rank {rank}")
    lines = ["| run | share of ΔW kept | " + " | ".join(f"{m} {k}" for m, k in SCORES) + " |",
             "|---" * (len(SCORES) + 2) + "|"]
    for name, row in rows.items():
        rank = int(name.rsplit(" ", 1)[1]) if name.startswith("compacted") else None
        share = f"{min(kept[rank].values()):.3f}" if rank else ("1" if name.startswith("pack") else "–")
        lines.append(f"| {name} | {share} | " + " | ".join(f"{row[m][k]:.2f}" for m, k in SCORES) + " |")
    n_edits = sum(len(c.edits) for c in cases)
    table = "\n".join(lines) + (f"\n\n{n_edits} ROME edits (solve_at={args.solve_at!r}) of the first "
                                f"{args.cases} cases of {path} ({len(dropped)} left out: their subject and prompt "
                                f"had another target in an earlier case), one pack, all attached, scored on "
                                f"{len(scored)} of them; share: the smallest over the edited weights of "
                                "‖ΔW_k‖² / ‖ΔW‖².\n")
    write_results(out, table, {"data": args.data, "cases": len(cases), "dropped": dropped, "edits": n_edits,
                               "scored": len(scored),
                               "scored_ids": [c.id for c in scored], "full_rank": full, "rows": rows,
                               "share_kept": {str(r): v for r, v in kept.items()}})
    runs = [f"compacted to rank {r}" for r in ranks] + [f"pack (rank {full})"]
    plot_against(out / "compact_rank.png", ranks + [full],
                 {f"{m} {k}": [rows[run][m][k] for run in runs] for m, k in SCORES},
                 {f"{m} {k}": rows["unedited"][m][k] for m, k in SCORES},
                 "rank of each weight's change (dotted: unedited)")


if __name__ == "__main__":
    main()
