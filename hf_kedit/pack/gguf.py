"""Packs for llama.cpp: a `weight_delta` pack becomes a GGUF LoRA adapter, the
file llama.cpp's `--lora` (and llama-cpp-python's `lora_path`) reads beside
the base model's own GGUF file.

What llama.cpp reads (docs/serving.md): `general.architecture` (the base
model's, which it checks), `general.type` "adapter", `adapter.type` "lora",
`adapter.lora.alpha`, and per edited weight `<gguf name>.weight.lora_a`
[r, in] and `.lora_b` [out, r] (torch order). It scales each pair by
alpha / r, r that pair's rank; alpha is the largest rank, and lower-rank
pairs carry r / alpha in B, so every weight changes by exactly B A.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import torch

from ..errors import IncompatiblePackError, PackFormatError
from ..kinds.weight_delta import export_factors

# Hugging Face model types whose llama.cpp architecture has another name (llama.cpp's
# converter maps MistralForCausalLM to llama, GPTNeoXForCausalLM to gptneox, PhiForCausalLM to phi2).
ARCH_OF_MODEL_TYPE = {"mistral": "llama", "gpt_neox": "gptneox", "phi": "phi2"}


def gguf_arch(model_type: str | None) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for a Hugging Face `model_type`; `IncompatiblePackError` if it has none."""
    name = ARCH_OF_MODEL_TYPE.get(model_type, model_type)
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise IncompatiblePackError(f"llama.cpp has no architecture for model_type {model_type!r}: the pack's edits "
                                "cannot be served by llama.cpp; use the pack with transformers (load_edits) or "
                                "its PEFT export (export_peft)")


def gguf_tensor_name(name_map: gguf.TensorNameMap, module: str) -> str:
    """llama.cpp's name for a module's weight (`model.layers.5.mlp.down_proj` ->
    `blk.5.ffn_down.weight`), from the gguf package's own name map."""
    name = name_map.get_name(module)
    if name is None:
        raise IncompatiblePackError(f"{module} has no llama.cpp tensor name in the gguf package's map: a pack "
                                    "that edits it cannot become a llama.cpp adapter")
    return f"{name}.weight"


def write_lora_adapter(pack, path: str | Path, rank: int | None = None, share: float | None = None) -> Path:
    """Write the weight_delta `pack` as a llama.cpp GGUF LoRA adapter at `path`
    (`rank`/`share`: its factors `compacted`, weight_delta.compacted)."""
    if pack.kind != "weight_delta":
        raise PackFormatError(f"{pack.kind} packs have no llama.cpp LoRA equivalent: only weight_delta packs "
                              "(rome, memit, steam, lora) export to GGUF. Routed steering maps and gated basis "
                              "interventions need hf_kedit's hooks: serve them with transformers (load_edits)")
    record = pack.base_model
    arch = gguf_arch(record.get("model_type"))
    layers = record.get("num_hidden_layers")
    if type(layers) is not int:
        raise PackFormatError("the pack's base_model records no num_hidden_layers: llama.cpp's tensor names "
                              "cannot be derived")
    name_map = gguf.get_tensor_name_map(arch, layers)
    factors = export_factors(pack, rank, share)
    names = {module: gguf_tensor_name(name_map, module) for module in factors}  # all checked before writing
    alpha = max(A.shape[0] for A, _ in factors.values())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    if record.get("name_or_path"):
        writer.add_string("general.name", f"hf_kedit {pack.method} edits of {record['name_or_path']}")
    for module, (A, B) in sorted(factors.items()):
        rank = A.shape[0]
        writer.add_tensor(f"{names[module]}.lora_a", A.to(torch.float32).contiguous().numpy())
        writer.add_tensor(f"{names[module]}.lora_b", (B.to(torch.float32) * (rank / alpha)).contiguous().numpy())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)  # atomic: no half-written adapter under the asked-for name
    finally:
        tmp.unlink(missing_ok=True)
    return path
