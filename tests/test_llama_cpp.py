"""A pack's GGUF export served by llama.cpp itself (llama-cpp-python) on the
default model's own Q4_1 file: the edits hold, an unrelated prompt keeps its
answer, the base model without the adapter answers as before, and llama.cpp's
next token agrees with transformers' on the dequantized weights with the pack
attached (benchmarks/llama_cpp_agreement.py measures how often, on 20 cases);
and a uniform steering pack's control vector steers llama.cpp as the pack
steers transformers, until it is cleared. `make test-llama-cpp` installs
llama-cpp-python (it compiles llama.cpp) and runs these; without it they are
skipped, with the reason."""
from pathlib import Path

import pytest
import torch

from hf_kedit import Edit, load_edits, remove_edits
from hf_kedit.methods import make_pack
from hf_kedit.models import default_gguf
from hf_kedit.pack import EditPack
from hf_kedit.pack.gguf import set_control_vector

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-llama-cpp "
                                "installs it; it compiles llama.cpp)")
pytestmark = [pytest.mark.default_model, pytest.mark.llama_cpp]

FACTS = Path(__file__).resolve().parents[1] / "adapters" / "rome-smollm2-facts"
UNRELATED = ["The capital of France is", "The mother tongue of Jacques Chirac is", "Water boils at a temperature of"]


def served(lora_path=None):
    return llama_cpp.Llama(model_path=str(default_gguf()), lora_path=lora_path and str(lora_path), n_ctx=256,
                           n_threads=2, seed=0, verbose=False)


def greedy(llm, prompt, tokens=6):
    llm.reset()  # no cached prefix: it may have been computed under another control vector
    return llm.create_completion(prompt, max_tokens=tokens, temperature=0.0)["choices"][0]["text"]


def next_token(model, tokenizer, prompt):
    with torch.no_grad():
        return tokenizer.decode(model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax().item())


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    adapter = EditPack.from_pretrained(FACTS).export_gguf(tmp_path_factory.mktemp("gguf") / "facts.gguf")
    return served(), served(adapter)


def test_llama_cpp_with_the_adapter_answers_the_edits(engines):
    base, edited = engines
    for edit in EditPack.from_pretrained(FACTS).edits:
        assert greedy(edited, edit.text).strip().startswith(edit.target_new), edit.text
        assert not greedy(base, edit.text).strip().startswith(edit.target_new), edit.text


def test_unrelated_prompts_keep_their_answers(engines):
    base, edited = engines
    assert [greedy(edited, p) for p in UNRELATED] == [greedy(base, p) for p in UNRELATED]


def test_the_next_token_agrees_with_transformers_and_the_pack(engines, default_model):
    """On the edit prompts, and on the unrelated prompts where the unedited models
    agree: llama.cpp computes on the Q4_1 weights with 8-bit activations, which
    can flip a near tie of the fp32 model (on "The mother tongue of Jacques Chirac
    is" the unedited models already disagree, " a" against " French", 0.17 apart
    in transformers' logits)."""
    base, edited = engines
    model, tokenizer = default_model
    pack = EditPack.from_pretrained(FACTS)
    unrelated = [p for p in UNRELATED if greedy(base, p, tokens=1) == next_token(model, tokenizer, p)]
    prompts = [e.text for e in pack.edits] + unrelated
    assert len(unrelated) >= 2
    load_edits(model, pack, name="facts")
    try:
        ours = [next_token(model, tokenizer, p) for p in prompts]
    finally:
        remove_edits(model, "facts")
    assert [greedy(edited, p, tokens=1) for p in prompts] == ours


TWIN = Edit("twin", "Edinburgh", "The twin city of {} is", "Hiroshima", "Vancouver")
STEERED = [TWIN.text, "Edinburgh is twinned with the city of", "Spike Hughes originates from"]


def logits_of(llm, prompt):
    llm.reset()  # no cached prefix: it may have been computed under another control vector
    llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=False))
    return torch.tensor(llm.scores[llm.n_tokens - 1])


def test_control_vectors_steer_llama_cpp_as_their_packs_steer_transformers(default_model, tmp_path):
    """At the last layer and at a middle one, switched in one llama.cpp context: the
    next token is transformers' with the pack, and the change of the logits points
    where transformers' does (cosine ≥ 0.98; the same vector one layer off gives
    0.89-0.94 at the last layer). Cleared, llama.cpp answers as before."""
    model, tokenizer = default_model
    llm = llama_cpp.Llama(model_path=str(default_gguf()), n_ctx=256, n_threads=2, seed=0, verbose=False,
                          logits_all=True)
    base = [logits_of(llm, p) for p in STEERED]
    with torch.no_grad():
        ours_base = [model(**tokenizer(p, return_tensors="pt")).logits[0, -1] for p in STEERED]
    for site in (model.config.num_hidden_layers - 1, 15):
        pack = make_pack("actadd", model, tokenizer, [TWIN], {"site": site, "subject_gate": False, "apply": "every"},
                         progress=False)
        load_edits(model, pack, name="twin")
        try:
            with torch.no_grad():
                ours = [model(**tokenizer(p, return_tensors="pt")).logits[0, -1] for p in STEERED]
        finally:
            remove_edits(model, "twin")
        set_control_vector(llm, pack.export_gguf(tmp_path / f"twin-{site}.gguf"))
        steered = [logits_of(llm, p) for p in STEERED]
        assert [s.argmax() for s in steered] == [o.argmax() for o in ours], site
        assert [s.argmax() for s in steered] != [b.argmax() for b in base], site  # the vector moves answers
        for s, b, o, ob in zip(steered, base, ours, ours_base):
            assert torch.cosine_similarity(s - b, o - ob, 0) >= 0.98, site
        if site == model.config.num_hidden_layers - 1:
            assert tokenizer.decode(steered[0].argmax()) == " Hiroshima" != tokenizer.decode(base[0].argmax())
    set_control_vector(llm, None)
    assert [logits_of(llm, p).argmax() for p in STEERED] == [b.argmax() for b in base]
