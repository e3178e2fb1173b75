"""Where SAKE's router sends prompts when many real edits are attached: the packs a
sequential `kedit bench` run kept (its state folder), attached in their order up
to each of --at edits, and the router's decision recorded for every probe of a
fixed sample of the cases edited so far (the sample the run's checkpoint
scored): the edit prompt and its paraphrases should route to their own edit,
the neighbourhood prompts (other subjects) to none. For the subject gate, the
share of each group's prompts that name some attached edit's subject. Prints a Markdown table;
writes results.json, results.md and routing.png into --out.

    python benchmarks/scope_routing.py --state docs/bench/lifelong-10k/sake/state/sake-sequential \\
        --data easyedit:../shared/data/counterfact_easyedit.json --at 100,1000 --out docs/bench/scope-routing
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_kedit import EditPack, load_edits, stack_of
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.kinds import steering_map
from hf_kedit.kinds.steering_map import names_subject
from hf_kedit.anatomy import input_device

from bench_setup import arguments, prepared, write_results

PROBES = {"edit prompt": ("efficacy", "own"), "paraphrases": ("generality", "own"), "neighbours": ("locality", "none")}


class RecordedRoutes:
    """Every decision `Router.route` returns while in use (prompt calls only)."""

    def __init__(self):
        self.routes: list[torch.Tensor] = []
        self.entries: list[int] = []

    def __enter__(self):
        original = self.original = steering_map.Router.route

        def route(router, queries, texts=None):
            routed = original(router, queries, texts)
            self.routes.append(routed.cpu())
            self.entries.append(len(router.steerings))
            return routed
        steering_map.Router.route = route
        return self

    def __exit__(self, *exc):
        steering_map.Router.route = self.original


def routed_ids(model, tokenizer, prompts: list[str], edit_ids: list[str]) -> list[str | None]:
    """The id of the edit each prompt is routed to (None: no edit), from one padded forward."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(input_device(model))
    with RecordedRoutes() as recorded, torch.no_grad():
        model(**batch)
    (routed,) = recorded.routes
    if recorded.entries != [len(edit_ids)]:
        raise RuntimeError(f"the router holds {recorded.entries} entries, not the {len(edit_ids)} edits attached")
    return [edit_ids[i] if i >= 0 else None for i in routed.tolist()]


def shares(model, tokenizer, cases, edit_ids: list[str], subjects: list[str], label: str) -> dict:
    """Per probe group: the share of its prompts routed to their own edit, to another,
    to none; and the share that names some attached edit's subject (the subject
    gate lets only those through)."""
    counts = {group: {"own": 0, "other": 0, "none": 0, "names_a_subject": 0} for group in PROBES}
    for case in tqdm(cases, desc=label):
        own = case.edits[0].id
        groups = [(g, p.prompt) for g, (metric, _) in PROBES.items() for p in case.probes.get(metric, [])]
        prompts = [p for _, p in groups]
        named = names_subject(prompts, subjects).any(1).tolist()
        for (group, _), routed, names in zip(groups, routed_ids(model, tokenizer, prompts, edit_ids), named):
            counts[group]["none" if routed is None else "own" if routed == own else "other"] += 1
            counts[group]["names_a_subject"] += names
    return {g: {k: v / max(1, c["own"] + c["other"] + c["none"]) for k, v in c.items()}
            | {"prompts": c["own"] + c["other"] + c["none"]} for g, c in counts.items()}


def main() -> None:
    parser = arguments(__doc__, out="docs/bench/scope-routing")
    parser.add_argument("--state", required=True, help="a sequential run's state folder (METHOD-sequential)")
    parser.add_argument("--data", required=True, help="FORMAT:PATH, as the run read its cases")
    parser.add_argument("--at", default="100,1000", help="numbers of edits attached, each a multiple of a pack")
    parser.add_argument("--sample", type=int, default=500)
    args = parser.parse_args()
    model, tokenizer, out = prepared(args)
    tokenizer.padding_side = "left"
    state = Path(args.state)
    progress = json.loads((state / "progress.json").read_text())["progress"]
    fmt, path = args.data.split(":", 1)
    cases = {c.id: c for c in read_cases(fmt, path)}
    rows, order, edited = [], [], []
    for n in [int(x) for x in args.at.split(",")]:
        while len(edited) < n:
            name = progress["attached"][len(order)]
            pack = EditPack.from_pretrained(state / "packs" / name)
            load_edits(model, pack, name=name, on_conflict="last", tokenizer=tokenizer)
            order.append(name)
            edited += [cases[e.id] for e in pack.edits]
        # the router's entries, in attachment order, less the edits a newer one superseded
        entries = [e for name in order for e in stack_of(model).packs[name].pack.edits]
        sample = [edited[i] for i in sorted(random.Random(0).sample(range(len(edited)),
                                                                    min(args.sample, len(edited))))]
        rows.append({"n_edits": len(edited), "router_entries": len(entries), "scored": len(sample),
                     **shares(model, tokenizer, sample, [e.id for e in entries], [e.subject for e in entries],
                              f"routing at {len(edited)} edits")})

    table = ["| edits attached | cases | edit prompt → own | paraphrases → own | paraphrases → other | "
             "paraphrases → none | neighbours → none | neighbours → an edit | neighbours naming an edited subject |",
             "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['n_edits']} | {r['scored']} | {r['edit prompt']['own']:.2f} | {r['paraphrases']['own']:.2f} | "
              f"{r['paraphrases']['other']:.2f} | {r['paraphrases']['none']:.2f} | {r['neighbours']['none']:.2f} | "
              f"{1 - r['neighbours']['none']:.2f} | {r['neighbours']['names_a_subject']:.2f} |" for r in rows]
    write_results(out, "\n".join(table), {"state": args.state, "data": args.data, "sample": args.sample,
                                          "rows": rows})
    _plot(rows, out / "routing.png")


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    xs = [r["n_edits"] for r in rows]
    for label, group, key in (("edit prompt → own edit", "edit prompt", "own"),
                              ("paraphrase → own edit", "paraphrases", "own"),
                              ("paraphrase → another edit", "paraphrases", "other"),
                              ("neighbour → no edit", "neighbours", "none")):
        ax.plot(xs, [r[group][key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("edits attached")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
