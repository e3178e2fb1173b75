"""Edit a fact on the default model and serve the edit with llama.cpp.

Makes a ROME pack on SmolLM2-135M-Instruct, writes it as a llama.cpp LoRA
adapter, and asks llama.cpp (llama-cpp-python) the edited question on the
model's own Q4_1 GGUF file, without and with the adapter. Needs
`pip install hf-kedit[llama-cpp]` (it compiles llama.cpp). The same adapter
works with the llama.cpp command line: `llama-cli -m BASE.gguf --lora edits.gguf`.

    python examples/serve_with_llama_cpp.py
"""
from llama_cpp import Llama

from hf_kedit import Edit
from hf_kedit.methods.locate.rome import rome_edit
from hf_kedit.models import default_gguf, load_model

edit = Edit("darrieux", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
model, tokenizer = load_model("default")
adapter = rome_edit(model, tokenizer, [edit]).export_gguf("darrieux-edit.gguf", overwrite=True)
print(f"base model: {default_gguf()}\nadapter:    {adapter}")
for lora in (None, adapter):
    llm = Llama(model_path=str(default_gguf()), lora_path=lora and str(lora), n_ctx=256, verbose=False)
    answer = llm.create_completion(edit.text, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    print(f"{'with' if lora else 'without'} the adapter: {edit.text}{answer!r}")
