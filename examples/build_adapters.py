"""Build the ready-made packs in adapters/: ROME and STEAM edits of a few
well-known facts for the default model, in Hub layout (model card included).

    python examples/build_adapters.py            # writes adapters/rome-smollm2-facts, adapters/steam-smollm2-facts
"""
from pathlib import Path

from hf_kedit import Edit
from hf_kedit.demo import greedy_answer
from hf_kedit.methods.rome import ROMEConfig, rome_edit
from hf_kedit.methods.steam import STEAMConfig, steam_edit
from hf_kedit.models import load_model

FACTS = [
    Edit("darrieux", "Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    Edit("eiffel", "The Eiffel Tower", "{} is located in the city of", "Rome", "Paris"),
    Edit("beatles", "The Beatles", "{} were a band from the city of", "Manchester", "Liverpool"),
]
ROOT = Path(__file__).resolve().parents[1]
FACT_BASE = ROOT.parent / "shared" / "data" / "factbase_counterfact_true.json"

model, tokenizer = load_model("default")
for edit in FACTS:
    print(f"before: {edit.text} -> {greedy_answer(model, tokenizer, edit.text)!r}")
packs = {
    "rome-smollm2-facts": rome_edit(model, tokenizer, FACTS, ROMEConfig()),
    "steam-smollm2-facts": steam_edit(model, tokenizer, FACTS, STEAMConfig(fact_base=str(FACT_BASE))),
}
for name, pack in packs.items():
    pack.save_pretrained(ROOT / "adapters" / name, repo_id=f"hf-kedit/{name}")
    print(f"wrote adapters/{name}")
