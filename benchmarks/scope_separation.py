"""Which steering router tells an edit's prompts from its neighbours? On CounterFact
cases, each edit's scope centroid is built as `sake` builds it (the prompt and its
template paraphrases); the router then measures the case's paraphrase prompts and
doubt prompt (should be in scope), its neighbourhood prompts (same relation,
other subjects: should not) and its generation prompts (same subject, mostly
other relations: reported, not optimised). Per router, the threshold that maximises
(paraphrases in + neighbours out) / 2 and the rates there, with and without the
subject gate. Prints a Markdown table; writes results.json, results.md and
separation.png into --out.

    python benchmarks/scope_separation.py --data ../shared/data/counterfact.json --start 100 --limit 40 \
        --out docs/bench/scope-separation
"""
from __future__ import annotations

import importlib.util

import torch
from tqdm.auto import tqdm

from hf_kedit.anatomy import anatomy_of
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.evaluate.metrics import with_robustness
from hf_kedit.kinds.prompt_calls import hidden_size
from hf_kedit.kinds.sentence_embedding import EMBEDDING_MODELS
from hf_kedit.kinds.steering_map import SteeringMapConfig, names_subject, scope_distances
from hf_kedit.methods.steering.core import SteeringConfig, paraphrase_set, router_representations

from bench_setup import arguments, prepared, write_results

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def routers(model) -> dict[str, SteeringMapConfig]:
    d, n = hidden_size(model), anatomy_of(model).num_layers
    out = {"final norm": SteeringMapConfig(hidden_size=d, scope_size=d)}
    for layer in range(n // 6, n, n // 6):
        out[f"layer {layer}"] = SteeringMapConfig(hidden_size=d, representation="layer", layer=layer, scope_size=d)
    if importlib.util.find_spec(EMBEDDING_MODELS[MINILM][1]):
        out["MiniLM sentence embedding"] = SteeringMapConfig(
            hidden_size=d, representation="sentence_embedding", embedding_model=MINILM,
            scope_size=EMBEDDING_MODELS[MINILM][2])
    return out


def separation(distances: dict[str, torch.Tensor]) -> dict:
    """The threshold maximising (paraphrases in + neighbours out) / 2, and the rates there."""
    candidates = torch.cat([distances["paraphrase"], distances["neighbour"]])
    candidates = candidates[candidates.isfinite()].unique()
    if not len(candidates):
        return {"threshold": None, "balanced": 0.5, **{f"{k}_in": 0.0 for k in distances}}
    inside = {k: (v[None] <= candidates[:, None]).float().mean(1) for k, v in distances.items()}
    balanced = (inside["paraphrase"] + 1 - inside["neighbour"]) / 2
    best = balanced.argmax()
    return {"threshold": candidates[best].item(), "balanced": balanced[best].item(),
            **{f"{k}_in": v[best].item() for k, v in inside.items()}}


def main():
    parser = arguments(__doc__, out="docs/bench/scope-separation")
    parser.add_argument("--data", default="../shared/data/counterfact.json")
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--limit", type=int, default=40)
    args = parser.parse_args()
    model, tokenizer, out = prepared(args)
    cases = [with_robustness(c) for c in read_cases("counterfact", args.data, args.start + args.limit)[args.start:]]
    groups = {"paraphrase": "generality", "doubt": "robustness", "neighbour": "locality", "same_subject": None}
    rows = []
    for name, config in tqdm(routers(model).items(), desc="routers"):
        measured = {gate: {k: [] for k in groups} for gate in (False, True)}
        for case in cases:
            edit = case.edits[0]
            own = router_representations(model, tokenizer, config, paraphrase_set(edit, SteeringConfig()))
            centroid = own.mean(0, keepdim=True)
            for key, metric in groups.items():
                prompts = ([p.prompt for p in case.probes[metric]] if metric else
                           list(dict.fromkeys(case.generation_prompts)))
                distance = scope_distances(router_representations(model, tokenizer, config, prompts), centroid,
                                           config.metric)[:, 0]
                measured[False][key].append(distance)
                measured[True][key].append(distance.masked_fill(~names_subject(prompts, [edit.subject])[:, 0],
                                                                float("inf")))
        for gate in (False, True):
            rows.append({"router": name, "subject_gate": gate,
                         **separation({k: torch.cat(v) for k, v in measured[gate].items()})})

    table = ["| router | subject gate | best threshold (cosine) | paraphrases in | doubt prompts in | neighbours in | "
             "same subject, other prompts in |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['router']} | {'on' if r['subject_gate'] else 'off'} | "
              f"{'–' if r['threshold'] is None else format(r['threshold'], '.3f')} | {r['paraphrase_in']:.2f} | "
              f"{r['doubt_in']:.2f} | {r['neighbour_in']:.2f} | {r['same_subject_in']:.2f} |" for r in rows]
    write_results(out, "\n".join(table), {"model": args.model, "data": args.data, "start": args.start,
                                          "limit": args.limit, "rows": rows})
    _plot(rows, out / "separation.png")


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{r['router']}{' + gate' if r['subject_gate'] else ''}" for r in rows]
    y = torch.arange(len(rows)).float()
    ax.barh(y - 0.2, [r["paraphrase_in"] for r in rows], height=0.4, label="paraphrases in scope")
    ax.barh(y + 0.2, [r["neighbour_in"] for r in rows], height=0.4, label="neighbours in scope")
    ax.set_yticks(y.tolist(), labels)
    ax.invert_yaxis()
    ax.set_xlabel("fraction at each router's best threshold")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
