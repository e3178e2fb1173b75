"""Build the ready-made packs in adapters/: ROME, STEAM, SAKE and BaFT edits of
a few well-known facts for the default model, in Hub layout (model card included).

    python examples/build_adapters.py          # writes adapters/{rome,steam,sake,baft}-smollm2-facts
    python examples/build_adapters.py sake     # only the packs of the methods named
"""
import sys
from pathlib import Path

from hf_kedit import Edit
from hf_kedit.demo import greedy_answer
from hf_kedit.methods.representation.baft import baft_edit
from hf_kedit.methods.locate.rome import ROMEConfig, rome_edit
from hf_kedit.methods.steering.sake import sake_edit
from hf_kedit.methods.locate.steam import STEAMConfig, steam_edit
from hf_kedit.models import load_model

FACTS = [
    Edit("darrieux", "Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    Edit("eiffel", "The Eiffel Tower", "{} is located in the city of", "Rome", "Paris"),
    Edit("beatles", "The Beatles", "{} were a band from the city of", "Manchester", "Liverpool"),
]
# SAKE's maps lead to the states the model has when told the new fact ("Do not
# mention 'French'. Repeat this sentence: '... is English'. ... is"); on those
# prompts the default model still answers "French" and "Paris", so SAKE cannot
# make the first two edits above (docs/steering.md). Its pack edits facts the
# model does follow there.
STEERING_FACTS = [
    Edit("kurzweil", "Ray Kurzweil", "{} works for", "Microsoft", "Google"),
    Edit("ios", "iOS", "{} is created by", "Microsoft", "Apple"),
    Edit("darmstadt", "Darmstadt", "{} is located in the country of", "Argentina", "Germany"),
]
ROOT = Path(__file__).resolve().parents[1]
FACT_BASE = ROOT.parent / "shared" / "data" / "factbase_counterfact_true.json"

BUILDERS = {
    "rome": lambda: rome_edit(model, tokenizer, FACTS, ROMEConfig()),
    "steam": lambda: steam_edit(model, tokenizer, FACTS, STEAMConfig(fact_base=str(FACT_BASE))),
    "sake": lambda: sake_edit(model, tokenizer, STEERING_FACTS),
    "baft": lambda: baft_edit(model, tokenizer, FACTS),
}
methods = sys.argv[1:] or list(BUILDERS)
model, tokenizer = load_model("default")
for edit in FACTS + STEERING_FACTS:
    print(f"before: {edit.text} -> {greedy_answer(model, tokenizer, edit.text)!r}")
for method in methods:
    name = f"{method}-smollm2-facts"
    BUILDERS[method]().save_pretrained(ROOT / "adapters" / name, repo_id=f"hf-kedit/{name}", overwrite=True)
    print(f"wrote adapters/{name}")
