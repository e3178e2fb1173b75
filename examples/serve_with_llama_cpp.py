"""Edit a fact on the default model and serve the edit with llama.cpp.

Makes a ROME pack on SmolLM2-135M-Instruct, writes it as a llama.cpp LoRA
adapter, and asks llama.cpp (llama-cpp-python) the edited question on the
model's own Q4_1 GGUF file, without and with the adapter. Then a uniform
ActAdd steering pack at the last layer, written as a llama.cpp control vector
and applied to the same llama.cpp context (it steers every prompt, so the
unrelated question moves too). Needs `pip install hf-kedit[llama-cpp]` (it
compiles llama.cpp). The same files work with the llama.cpp command line:
`llama-cli -m BASE.gguf --lora edits.gguf` or `--control-vector steer.gguf`.

    python examples/serve_with_llama_cpp.py
"""
from llama_cpp import Llama

from hf_kedit import Edit
from hf_kedit.methods import make_pack
from hf_kedit.methods.locate.rome import rome_edit
from hf_kedit.models import default_gguf, load_model
from hf_kedit.pack.gguf import set_control_vector

edit = Edit("darrieux", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
model, tokenizer = load_model("default")
adapter = rome_edit(model, tokenizer, [edit]).export_gguf("darrieux-edit.gguf", overwrite=True)
print(f"base model: {default_gguf()}\nadapter:    {adapter}")
for lora in (None, adapter):
    llm = Llama(model_path=str(default_gguf()), lora_path=lora and str(lora), n_ctx=256, verbose=False)
    answer = llm.create_completion(edit.text, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    print(f"{'with' if lora else 'without'} the adapter: {edit.text}{answer!r}")

twin = Edit("twin", "Edinburgh", "The twin city of {} is", "Hiroshima", "Vancouver")
steering = make_pack("actadd", model, tokenizer, [twin], {"site": model.config.num_hidden_layers - 1,
                                                          "subject_gate": False, "apply": "every"})
vector = steering.export_gguf("twin-steer.gguf", overwrite=True)
llm = Llama(model_path=str(default_gguf()), n_ctx=256, verbose=False)
for applied in (None, vector):
    set_control_vector(llm, applied)
    for prompt in (twin.text, "The capital of France is"):
        llm.reset()  # a cached prefix was computed under the previous vector
        answer = llm.create_completion(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]
        print(f"{'with' if applied else 'without'} the control vector: {prompt}{answer!r}")
