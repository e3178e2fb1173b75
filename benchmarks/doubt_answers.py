"""What an edited model writes after the doubt prompt of the robustness metric,
read in full rather than only by its first words. The harness's robustness
`gen` counts a case when the greedy continuation *starts with* the new
object; this script generates --tokens tokens per doubt prompt with the
unedited model and with each --methods pack (one case at a time, the pack
removed after it) and sorts each continuation's first line into:

- starts: it starts with the new object (the harness's `gen` rule);
- restates: it names the new object later, and not the old one (e.g. it
  repeats the edited sentence: "'Mount Bursey is located in Africa");
- old: it names the old object and not the new one;
- both, neither.

Prints a Markdown table; writes results.json (shares and every continuation),
results.md and answers.png into --out.

    python benchmarks/doubt_answers.py --data counterfact:../shared/data/counterfact.json --skip 200 \\
        --limit 100 --methods sake --out docs/bench/doubt-answers/counterfact-200-299
"""
from __future__ import annotations

import re

from tqdm import tqdm

from hf_kedit import load_edits, remove_edits
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.evaluate.metrics import DOUBT_TEMPLATES, normalise, says
from hf_kedit.evaluate.scoring import Scorer
from hf_kedit.methods import make_pack

from bench_setup import arguments, prepared, write_results

KINDS = ("starts", "restates", "old", "both", "neither")


def names(text: str, answer: str) -> bool:
    """Whether normalised `text` holds `answer` as whole words."""
    return re.search(rf"(?<!\w){re.escape(normalise(answer))}(?!\w)", text) is not None


def kind_of(continuation: str, new: str, old: str | None) -> str:
    """Which of KINDS the continuation's first non-empty line is."""
    line = next((part for part in continuation.split("\n") if part.strip()), "")
    text = normalise(line)
    if says(text, normalise(new)):
        return "starts"
    has_new, has_old = names(text, new), bool(old) and names(text, old)
    return "both" if has_new and has_old else "restates" if has_new else "old" if has_old else "neither"


def doubt_prompts(case) -> list[tuple[str, str, str | None]]:
    """(prompt, new object, old object) per edit of the case and doubt template."""
    return [(t.format(prompt=e.text, new=e.target_new), e.target_new, e.target_true)
            for e in case.edits for t in DOUBT_TEMPLATES]


def continuations(scorer: Scorer, prompts: list[str], tokens: int) -> list[str]:
    return [scorer.decode(ids) for ids in scorer.generate(prompts, tokens)]


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--data", required=True, help="FORMAT:PATH of a benchmark")
    p.add_argument("--skip", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--methods", default="sake", help="comma-separated methods, each beside the unedited model")
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per doubt prompt")
    args = p.parse_args()
    model, tokenizer, out = prepared(args)
    fmt, path = args.data.split(":", 1)
    cases = read_cases(fmt, path, limit=args.skip + args.limit)[args.skip:]
    scorer = Scorer(model, tokenizer)
    rows = {case.id: {"probes": doubt_prompts(case), "texts": {}} for case in cases}
    every = [probe[0] for row in rows.values() for probe in row["probes"]]
    texts = iter(continuations(scorer, every, args.tokens))
    for row in rows.values():
        row["texts"]["unedited"] = [next(texts) for _ in row["probes"]]
    methods = args.methods.split(",")
    for method in methods:
        for case in tqdm(cases, desc=f"{method}: edit and generate", unit="case"):
            pack = make_pack(method, model, tokenizer, case.edits, progress=False)
            load_edits(model, pack, name="doubt", tokenizer=tokenizer)
            try:
                rows[case.id]["texts"][method] = continuations(scorer, [q for q, _, _ in rows[case.id]["probes"]],
                                                               args.tokens)
            finally:
                remove_edits(model, "doubt")
    shares, per_case = {}, {}
    for label in ["unedited", *methods]:
        kinds = [kind_of(text, new, old) for row in rows.values()
                 for (_, new, old), text in zip(row["probes"], row["texts"][label])]
        shares[label] = {k: kinds.count(k) / len(kinds) for k in KINDS}
    for case_id, row in rows.items():
        per_case[case_id] = [{"prompt": q, "new": new, "old": old,
                              **{label: {"text": text[i], "kind": kind_of(text[i], new, old)}
                                 for label, text in row["texts"].items()}}
                             for i, (q, new, old) in enumerate(row["probes"])]
    header = "| model | " + " | ".join(KINDS) + " | names the new object (starts + restates) |"
    lines = [header, "|---" * (len(KINDS) + 2) + "|"]
    for label, share in shares.items():
        lines.append(f"| {label} | " + " | ".join(f"{share[k]:.2f}" for k in KINDS)
                     + f" | {share['starts'] + share['restates']:.2f} |")
    table = "\n".join(lines) + (f"\n\n{len(every)} doubt prompts of {len(cases)} cases ({args.data}, from case "
                                f"{args.skip}); greedy, {args.tokens} tokens, the continuation's first line.\n")
    plot(shares, out / "answers.png")
    write_results(out, table, {"data": args.data, "skip": args.skip, "limit": args.limit, "tokens": args.tokens,
                               "shares": shares, "per_case": per_case})


def plot(shares: dict, path) -> None:
    """Stacked bars: each model's continuations by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = list(shares)
    bottom = [0.0] * len(labels)
    for kind in KINDS:
        heights = [shares[label][kind] for label in labels]
        ax.bar(labels, heights, bottom=bottom, label=kind)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("share of doubt prompts")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
