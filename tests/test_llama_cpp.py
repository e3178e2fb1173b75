"""A pack's GGUF export served by llama.cpp itself (llama-cpp-python) on the
default model's own Q4_1 file: the edits hold, an unrelated prompt keeps its
answer, the base model without the adapter answers as before, and llama.cpp's
next token agrees with transformers' on the dequantized weights with the pack
attached (benchmarks/llama_cpp_agreement.py measures how often, on 20 cases). `make test-llama-cpp` installs llama-cpp-python (it compiles
llama.cpp) and runs these; without it they are skipped, with the reason."""
from pathlib import Path

import pytest
import torch

from hf_kedit import load_edits, remove_edits
from hf_kedit.models import default_gguf
from hf_kedit.pack import EditPack

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-llama-cpp "
                                "installs it; it compiles llama.cpp)")
pytestmark = [pytest.mark.default_model, pytest.mark.llama_cpp]

FACTS = Path(__file__).resolve().parents[1] / "adapters" / "rome-smollm2-facts"
UNRELATED = ["The capital of France is", "The mother tongue of Jacques Chirac is", "Water boils at a temperature of"]


def served(lora_path=None):
    return llama_cpp.Llama(model_path=str(default_gguf()), lora_path=lora_path and str(lora_path), n_ctx=256,
                           n_threads=2, seed=0, verbose=False)


def greedy(llm, prompt, tokens=6):
    return llm.create_completion(prompt, max_tokens=tokens, temperature=0.0)["choices"][0]["text"]


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

    def next_token(prompt):
        with torch.no_grad():
            return tokenizer.decode(model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax().item())

    unrelated = [p for p in UNRELATED if greedy(base, p, tokens=1) == next_token(p)]
    prompts = [e.text for e in pack.edits] + unrelated
    assert len(unrelated) >= 2
    load_edits(model, pack, name="facts")
    try:
        ours = [next_token(p) for p in prompts]
    finally:
        remove_edits(model, "facts")
    assert [greedy(edited, p, tokens=1) for p in prompts] == ours
