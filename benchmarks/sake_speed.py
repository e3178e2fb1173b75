"""How fast SAKE makes edits, model load excluded: seconds per edit for --edits
cases in one call (after one warm-up edit), and the tokens the state passes
read, real and padded, in the batches `last_token_states` forms (texts of
similar lengths together) and in batches of the texts in their order. Prints a
Markdown table; writes results.json and results.md into --out.

    python benchmarks/sake_speed.py --edits 16 --out docs/bench/sake-speed
"""
from __future__ import annotations

import time

from hf_kedit.batching import by_length
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.methods.steering.core import SteeringConfig, paraphrase_set, steering_sets
from hf_kedit.methods.steering.sake import sake_edit

from bench_setup import arguments, prepared, write_results


def padded(rows: list[list[int]], batches: list[list[int]]) -> int:
    """The tokens `batches` of `rows` hold, padding included."""
    return sum(len(batch) * max(len(rows[i]) for i in batch) for batch in batches)


def main() -> None:
    parser = arguments(__doc__, out=None)
    parser.add_argument("--data", default="easyedit:../shared/data/counterfact_easyedit.json")
    parser.add_argument("--edits", type=int, default=16)
    args = parser.parse_args()
    model, tokenizer, out = prepared(args)
    fmt, path = args.data.split(":", 1)
    edits = [c.edits[0] for c in read_cases(fmt, path, limit=args.edits + 1)]
    sake_edit(model, tokenizer, edits[:1], progress=False)
    start = time.perf_counter()
    sake_edit(model, tokenizer, edits[1:], progress=False)
    seconds = (time.perf_counter() - start) / len(edits[1:])
    config = SteeringConfig()
    rows = [tokenizer(t).input_ids for e in edits[1:] for part in steering_sets(e, paraphrase_set(e, config))
            for t in part]
    in_order = [list(range(i, min(i + config.batch_size, len(rows)))) for i in range(0, len(rows), config.batch_size)]
    results = {"edits": len(edits[1:]), "seconds_per_edit": seconds, "texts": len(rows),
               "real_tokens": sum(map(len, rows)), "padded_tokens": padded(rows, by_length(rows, config.batch_size)),
               "padded_tokens_in_text_order": padded(rows, in_order)}
    table = "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v:.2f} |\n" if isinstance(v, float) else
                                                     f"| {k} | {v} |\n" for k, v in results.items())
    write_results(out, table, results)


if __name__ == "__main__":
    main()
