"""One ROME edit on the default model: the answer before and after, on the edit
prompt, a paraphrase and unrelated neighbours, and the time the edit took.

    python examples/rome_single_edit.py              # C = I (no key statistics)
    python examples/rome_single_edit.py --covariance # key statistics from 20k self-sampled tokens (cached)
"""
import argparse
import time

from hf_kedit import load_edits, remove_edits
from hf_kedit.demo import DEMO_EDIT, greedy_answer
from hf_kedit.methods.rome import ROMEConfig, rome_edit
from hf_kedit.models import load_model

PROBES = [DEMO_EDIT.text, "Danielle Darrieux's mother tongue is", "Danielle Darrieux was born in",
          "The mother tongue of Jacques Chirac is", "The mother tongue of Victor Hugo is"]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="default")
parser.add_argument("--covariance", action="store_true")
args = parser.parse_args()

model, tokenizer = load_model(args.model)
before = {p: greedy_answer(model, tokenizer, p) for p in PROBES}
start = time.perf_counter()
pack = rome_edit(model, tokenizer, [DEMO_EDIT], ROMEConfig(covariance=args.covariance))
seconds = time.perf_counter() - start
load_edits(model, pack, name="rome")
print(f"ROME (covariance={args.covariance}): {seconds:.1f} s")
for prompt in PROBES:
    print(f"{prompt!r}: {before[prompt]!r} -> {greedy_answer(model, tokenizer, prompt)!r}")
remove_edits(model, "rome")
