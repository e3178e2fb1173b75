"""Fuzz pack loading: N mutated packs of every kind onto a tiny llama, counting what happened.

    python benchmarks/fuzz_packs.py --cases 10000 --out docs/benchmarks

Prints a table of outcomes per kind and writes fuzz_packs.json and fuzz_packs.md:
typed errors (hf_kedit's own, or FileNotFoundError), untyped errors (goal 0),
hangs (a case over --timeout seconds; goal 0), broken models (the model not
exactly as before after a failed load or after removing a loaded pack, or a
loaded pack whose forward raised; goal 0), and the most common messages.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pack_fuzz import KINDS, Outcome, good_folders, model_state, mutated_folder, run_case  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds after which a case counts as a hang")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    model = tiny_model("llama")
    rng = random.Random(args.seed)
    counts = {kind: collections.Counter() for kind in KINDS}
    messages = collections.Counter()
    failures = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders, reference = good_folders(model, root), model_state(model)
        for case in tqdm(range(args.cases), desc="fuzz cases", unit="case"):
            kind = KINDS[case % len(KINDS)]
            folder = mutated_folder(folders[kind], root / "case", random.Random(rng.getrandbits(64)))
            signal.setitimer(signal.ITIMER_REAL, args.timeout)
            try:
                outcome = run_case(model, folder, reference)
            except Hang:
                outcome = Outcome("hang", True, "over the time limit")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if outcome.broken or outcome.result == "hang":
                model = tiny_model("llama")  # the same weights, without what the case left behind
                reference = model_state(model)
            counts[kind][outcome.result] += 1
            counts[kind]["broken"] += outcome.broken
            messages[outcome.error.split(":")[0] + ": " + _shape(outcome.error) if outcome.error else "loaded"] += 1
            if outcome.result in ("untyped", "hang") or outcome.broken:
                failures.append({"case": case, "kind": kind, **vars(outcome),
                                 "error": re.sub(r"/\S*/", "", outcome.error)})  # no temporary paths
    seconds = time.perf_counter() - start
    report = {"cases": args.cases, "seed": args.seed, "seconds": round(seconds, 1),
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "by_kind": {k: dict(c) for k, c in counts.items()},
              "total": dict(sum(counts.values(), collections.Counter())),
              "failures": failures[:50], "top_messages": messages.most_common(25)}
    rows = [f"| {kind} | {c['typed']} | {c['loaded']} | {c['untyped']} | {c['hang']} | {c['broken']} |"
            for kind, c in [*counts.items(), ("all", collections.Counter(report["total"]))]]
    table = "\n".join(["| kind | typed errors | loaded and ran | untyped errors | hangs | broken models |",
                       "|---|---|---|---|---|---|", *rows])
    print(table)
    print(f"\n{args.cases} cases in {seconds:.0f} s; {len(failures)} failures")
    for f in failures[:10]:
        print(f"  case {f['case']} ({f['kind']}): {f['result']}, broken={f['broken']}: {f['error']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz_packs.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "fuzz_packs.md").write_text(
        f"# Fuzzing pack loading\n\n`python benchmarks/fuzz_packs.py --cases {args.cases} --seed {args.seed}` "
        f"(torch {report['torch']}, transformers {report['transformers']}, {seconds:.0f} s)\n\n{table}\n")


def _shape(error: str) -> str:
    """A message with its specifics (paths, numbers, quoted values) blurred, to group alike ones."""
    text = error.partition(": ")[2]
    text = re.sub(r"/\S+", "PATH", text)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    return re.sub(r"-?\d[\d.e+-]*", "N", text)[:90]


if __name__ == "__main__":
    main()
