"""Packs for llama.cpp: a `weight_delta` pack becomes a GGUF LoRA adapter, the
file llama.cpp's `--lora` (and llama-cpp-python's `lora_path`) reads beside
the base model's own GGUF file; a uniform `steering_map` pack of shifts
becomes a control vector (`--control-vector`).

What llama.cpp reads (docs/serving.md): `general.architecture` (the base
model's, which it checks), `general.type` "adapter", `adapter.type` "lora",
`adapter.lora.alpha`, and per edited weight `<gguf name>.weight.lora_a`
[r, in] and `.lora_b` [out, r] (torch order). It scales each pair by
alpha / r, r that pair's rank; alpha is the largest rank, and lower-rank
pairs carry r / alpha in B, so every weight changes by exactly B A.

A control vector file has `general.architecture` "controlvector" and one F32
vector `direction.K` [d] per steered layer; llama.cpp adds it to decoder
layer K's output (0-based, K ≥ 1: layer 0 has none) at every position.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import IncompatiblePackError, MissingDependencyError, PackFormatError
from ..kinds.steering_map import part_name
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


def write_gguf(pack, path: str | Path, rank: int | None = None, share: float | None = None) -> Path:
    """Write `pack` as the llama.cpp file that serves it at `path`: a LoRA adapter
    for a weight_delta pack (`rank`/`share`: its factors `compacted`,
    weight_delta.compacted), a control vector for a uniform steering_map pack of
    shifts. Every other pack is refused with what to use instead."""
    if pack.kind == "weight_delta":
        return _write_lora_adapter(pack, Path(path), rank, share)
    if pack.kind == "steering_map" and pack.kind_config.get("site") is not None:
        if rank is not None or share is not None:
            raise PackFormatError("rank and share compact a LoRA adapter's factors; a control vector has none: "
                                  "export the steering pack without them")
        return _write_control_vector(pack, Path(path))
    raise PackFormatError(f"{pack.kind} packs have no llama.cpp equivalent: weight_delta packs (rome, memit, steam, "
                          "lora) export as a LoRA adapter and uniform steering packs (actadd with site=K) as a "
                          "control vector. Routed steering maps and gated basis interventions decide per prompt "
                          "whether they act, which needs hf_kedit's hooks: serve them with transformers (load_edits)")


def _base_layers(pack) -> int:
    layers = pack.base_model.get("num_hidden_layers")
    if type(layers) is not int:
        raise PackFormatError("the pack's base_model records no num_hidden_layers: llama.cpp's tensor names "
                              "cannot be derived")
    return layers


def _write_lora_adapter(pack, path: Path, rank: int | None, share: float | None) -> Path:
    record = pack.base_model
    arch = gguf_arch(record.get("model_type"))
    name_map = gguf.get_tensor_name_map(arch, _base_layers(pack))
    factors = export_factors(pack, rank, share)
    names = {module: gguf_tensor_name(name_map, module) for module in factors}  # all checked before writing
    alpha = max(A.shape[0] for A, _ in factors.values())
    writer = gguf.GGUFWriter(str(_partial(path)), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    if record.get("name_or_path"):
        writer.add_string("general.name", f"hf_kedit {pack.method} edits of {record['name_or_path']}")
    for module, (A, B) in sorted(factors.items()):
        rank = A.shape[0]
        writer.add_tensor(f"{names[module]}.lora_a", A.to(torch.float32).contiguous().numpy())
        writer.add_tensor(f"{names[module]}.lora_b", (B.to(torch.float32) * (rank / alpha)).contiguous().numpy())
    return _finish(writer, path)


def _write_control_vector(pack, path: Path) -> Path:
    """One direction per site: the sum of the shifts of the pack's edits there (llama.cpp
    adds a control vector, so only maps that are pure shifts, rank 0, have one)."""
    site = pack.kind_config["site"]
    record = pack.base_model
    arch = gguf_arch(record.get("model_type"))  # refuses what llama.cpp cannot run, as for a LoRA adapter
    if not 1 <= site < _base_layers(pack):
        raise PackFormatError(f"the pack steers decoder layer {site}'s output; llama.cpp's control vectors act on "
                              f"layers 1 to {_base_layers(pack) - 1} only: make the pack with site between them")
    linear = [e.id for e in pack.edits if pack.tensors[part_name(e.id, "map.basis")].shape[-1] > 0]
    if linear:
        raise PackFormatError(f"edits {linear[:3]} are linear maps (rank > 0), which a control vector (an added "
                              "vector) cannot express: only pure shifts (actadd) export; serve these with "
                              "transformers (load_edits)")
    direction = sum(pack.tensors[part_name(e.id, "map.bias")].to(torch.float64) for e in pack.edits)
    writer = gguf.GGUFWriter(str(_partial(path)), "controlvector")
    writer.add_string("controlvector.model_hint", gguf.MODEL_ARCH_NAMES[arch])
    writer.add_uint32("controlvector.layer_count", 1)
    if record.get("name_or_path"):
        writer.add_string("general.name", f"hf_kedit {pack.method} edits of {record['name_or_path']}")
    writer.add_tensor(f"direction.{site}", direction.to(torch.float32).contiguous().numpy())
    return _finish(writer, path)


def control_vector_buffer(path: str | Path, layers: int | None = None) -> np.ndarray:
    """The directions of the control vector file at `path` laid out as llama.cpp's
    C function `llama_set_adapter_cvec` takes them: float32, n_embd per layer
    from layer 1 on (layer K at (K − 1) · n_embd), zeros for layers without
    one, as llama.cpp's own loader lays them out; up to the highest layer the
    file names, or for layers 1 to `layers` − 1 of a model of `layers` layers
    (`IncompatiblePackError` if the file names a layer beyond them).

    Example:
        >>> control_vector_buffer("steer.gguf", layers=30).shape     # d = 576
        (16704,)
    """
    reader = gguf.GGUFReader(str(path))
    directions = {}
    for tensor in reader.tensors:
        kind, _, layer = tensor.name.partition(".")
        if kind != "direction" or not layer.isdigit() or int(layer) < 1 or len(tensor.shape) != 1:
            raise PackFormatError(f"{path}: tensor {tensor.name!r} is not a control vector direction "
                                  "(direction.K, K ≥ 1, one dimension)")
        directions[int(layer)] = np.asarray(tensor.data, dtype=np.float32)
    if not directions or len({d.size for d in directions.values()}) != 1:
        raise PackFormatError(f"{path}: a control vector needs direction tensors of one width")
    if layers is not None and max(directions) >= layers:
        raise IncompatiblePackError(f"{path} steers layer {max(directions)}; the model has layers 1 to "
                                    f"{layers - 1} for control vectors: it was made for another model")
    width = next(iter(directions.values())).size
    buffer = np.zeros(width * (max(directions) if layers is None else layers - 1), dtype=np.float32)
    for layer, direction in directions.items():
        buffer[(layer - 1) * width:layer * width] = direction
    return buffer


def set_control_vector(llm, path: str | Path | None) -> None:
    """Apply the control vector file at `path` to a llama-cpp-python `Llama`, on
    every layer it names, as llama.cpp's `--control-vector` does; None clears it.
    llama-cpp-python's `Llama` takes no control vector file itself. Evaluate
    after `llm.reset()`: a cached prefix was computed under the old vector.

    Example:
        >>> set_control_vector(llm, pack.export_gguf("steer.gguf"))
        >>> llm.reset(); llm.create_completion("The twin city of Edinburgh is", max_tokens=4)
    """
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError("serving with llama.cpp from Python needs llama-cpp-python: "
                                     "pip install 'hf-kedit[llama-cpp]' (it compiles llama.cpp)") from None
    width = llm.n_embd()
    if path is None:
        llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, width, 0, 0)
        return
    layers = llama_cpp.llama_model_n_layer(llm.model)
    # llama.cpp writes only the layers the buffer covers and keeps the rest: a vector set before on a
    # later layer would stay, so the buffer covers every layer.
    buffer = control_vector_buffer(path, layers)
    if buffer.size != width * (layers - 1):
        raise IncompatiblePackError(f"{path}: its directions are not of this model's width {width}: it was made "
                                    "for another model")
    code = llama_cpp.llama_set_adapter_cvec(llm.ctx, buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                            buffer.size, width, 1, layers)
    if code != 0:
        raise IncompatiblePackError(f"llama.cpp refused the control vector {path} (code {code})")


def _partial(path: Path) -> Path:
    """Where a file is written before it takes its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".tmp")


def _finish(writer: gguf.GGUFWriter, path: Path) -> Path:
    tmp = _partial(path)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)  # atomic: no half-written file under the asked-for name
    finally:
        tmp.unlink(missing_ok=True)
    return path
