"""One edit on the default model with any method: the answer before and after,
on the edit prompt, a paraphrase, the same subject's other facts and unrelated
neighbours, and the time the edit took.

    python examples/single_edit.py                          # ROME, C = I (no key statistics)
    python examples/single_edit.py --set covariance=true    # ROME with key statistics (20k self-sampled tokens, cached)
    python examples/single_edit.py --method sake            # or steam, memit, baft, reft, actadd, lora
"""
import argparse
import time

from hf_kedit import load_edits, remove_edits
from hf_kedit.demo import DEMO_EDIT, greedy_answer
from hf_kedit.cli import parse_settings
from hf_kedit.methods import make_pack
from hf_kedit.models import load_model

PROBES = [DEMO_EDIT.text, "Danielle Darrieux's mother tongue is", "Danielle Darrieux was born in",
          "The mother tongue of Jacques Chirac is", "The mother tongue of Victor Hugo is"]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="default")
parser.add_argument("--method", default="rome")
parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method setting")
args = parser.parse_args()
settings = parse_settings(args.set)

model, tokenizer = load_model(args.model)
before = {p: greedy_answer(model, tokenizer, p) for p in PROBES}
start = time.perf_counter()
pack = make_pack(args.method, model, tokenizer, [DEMO_EDIT], settings)
seconds = time.perf_counter() - start
load_edits(model, pack, name=args.method, tokenizer=tokenizer)
print(f"{args.method} {settings or ''}: {seconds:.1f} s")
for prompt in PROBES:
    print(f"{prompt!r}: {before[prompt]!r} -> {greedy_answer(model, tokenizer, prompt)!r}")
remove_edits(model, args.method)
