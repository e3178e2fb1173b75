"""Random packs for tests, and tampering with saved ones: the values do not matter, the plumbing does."""
import hashlib
import json

import torch
from safetensors.torch import load_file, save_file

from hf_kedit import Edit
from hf_kedit.anatomy import anatomy_of, linear_shape
from hf_kedit.methods.builders import weight_delta_pack
from hf_kedit.pack import CONFIG_NAME, WEIGHTS_NAME


def random_pack(model, layers=(1,), n_edits=1, rank=1, seed=0, prefix="e", scale=0.5, subject="S{}"):
    """A weight_delta pack of `n_edits` edits, each a rank-`rank` delta on the MLP
    output projection of every layer in `layers`."""
    g = torch.Generator().manual_seed(seed)
    anatomy = anatomy_of(model)
    edits, factors = [], {}
    for i in range(n_edits):
        eid = f"{prefix}{i}"
        edits.append(Edit(eid, subject.format(i), "The capital of {} is", f"T{seed}-{i}", "Old"))
        factors[eid] = {}
        for layer in layers:
            module = anatomy.mlp_out(layer)
            out_f, in_f = linear_shape(model.get_submodule(module))
            A = torch.randn(rank, in_f, generator=g) * scale
            B = torch.randn(out_f, rank, generator=g) * scale
            factors[eid][module] = (A, B)
    return weight_delta_pack(model, "random", {"seed": seed}, edits, factors)


def delta_matrix(pack, module):
    """ΔW (out, in) of every edit of `pack` on `module`."""
    total = None
    for e in pack.edits:
        a, b = f"{e.id}.{module}.lora_A", f"{e.id}.{module}.lora_B"
        if a in pack.tensors:
            d = pack.tensors[b] @ pack.tensors[a]
            total = d if total is None else total + d
    return total


def random_basis_pack(model, layers=(1,), n_edits=1, rank=2, seed=0, prefix="e", positions="l1", gated=False,
                      scale=1.0, subject="S{}", gate_floor=0.0, shared=False):
    """A basis_intervention pack of `n_edits` edits, each a rank-`rank` intervention (random
    orthonormal R, random W, b and, `gated`, gate G, c with `gate_floor`) at every layer in `layers`;
    `shared` (gated only): one such intervention that every edit owns (the first edit's)."""
    from hf_kedit.kinds.basis_intervention import SHARED_OWNER, BasisInterventionConfig
    from hf_kedit.kinds.prompt_calls import hidden_size
    from hf_kedit.methods.builders import basis_intervention_pack

    g = torch.Generator().manual_seed(seed)
    d = hidden_size(model)
    edits, parts = [], {}
    for i in range(n_edits):
        eid = f"{prefix}{i}"
        edits.append(Edit(eid, subject.format(i), "The capital of {} is", f"T{seed}-{i}", "Old"))
        parts[eid] = {}
        for layer in layers:
            R = torch.linalg.qr(torch.randn(d, rank, generator=g)).Q.T.contiguous()
            parts[eid][layer] = {"rotation": R, "source.weight": torch.randn(rank, d, generator=g) * scale,
                                 "source.bias": torch.randn(rank, generator=g) * scale}
            if gated:
                parts[eid][layer].update({"gate.weight": torch.randn(rank, d, generator=g),
                                          "gate.bias": torch.randn(rank, generator=g)})
    config = BasisInterventionConfig(peft_type="BAFT" if gated else "LOREFT", gate="sigmoid_rms" if gated else "none",
                                     r=rank, layers=list(layers), positions=positions, hidden_size=d,
                                     gate_floor=gate_floor, shared_bases=shared)
    if shared:
        parts = {SHARED_OWNER: parts[edits[0].id]}
    return basis_intervention_pack(model, "random", {"seed": seed}, edits, config, parts)


def random_steering_pack(model, centroids, threshold=1e-3, rank=3, seed=0, prefix="e", metric="cosine",
                         apply="first", layer=None, scale=0.5, subject="S{}", site=None):
    """A steering_map pack with one edit per row of `centroids` [E, d]: a random map
    (orthonormal U [d, rank], M [rank, rank], b [d]) and a scope of `threshold` around
    that centroid, read at the final norm or decoder layer `layer`; with `site`, a
    uniform pack acting on that decoder layer's output (threshold 2.0, apply "every")."""
    if site is not None:
        threshold, apply = 2.0, "every"
    from hf_kedit.kinds.prompt_calls import hidden_size
    from hf_kedit.kinds.steering_map import SteeringMapConfig
    from hf_kedit.methods.builders import steering_map_pack

    g = torch.Generator().manual_seed(seed)
    d = hidden_size(model)
    edits, parts = [], {}
    for i, centroid in enumerate(centroids):
        eid = f"{prefix}{i}"
        edits.append(Edit(eid, subject.format(i), "The capital of {} is", f"T{seed}-{i}", "Old"))
        parts[eid] = {"map.basis": torch.linalg.qr(torch.randn(d, rank, generator=g)).Q,
                      "map.core": torch.randn(rank, rank, generator=g) * scale,
                      "map.bias": torch.randn(d, generator=g) * scale,
                      "scope.centroid": centroid.float(), "scope.threshold": torch.tensor([float(threshold)])}
    config = SteeringMapConfig(hidden_size=d, representation="final_norm" if layer is None else "layer", layer=layer,
                               scope_size=d, metric=metric, apply=apply, site=site)
    return steering_map_pack(model, "random", {"seed": seed}, edits, config, parts)


def rewrite_pack(folder, change_tensors=None, change_manifest=None):
    """Rewrite a saved pack in place (its tensors and/or manifest) as a tampered
    upload would, with the manifest's tensor list kept consistent."""
    path, manifest = folder / WEIGHTS_NAME, json.loads((folder / CONFIG_NAME).read_text())
    if change_tensors:
        tensors = load_file(str(path))
        change_tensors(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
        manifest["tensors"] = {n: {"shape": list(t.shape), "dtype": "float32"} for n, t in tensors.items()}
    if change_manifest:
        change_manifest(manifest)
    manifest["files"] = {WEIGHTS_NAME: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}
    (folder / CONFIG_NAME).write_text(json.dumps(manifest))


def set_tensor(name, value):
    return lambda tensors: tensors.__setitem__(name, value(tensors[name]))


def kind_config_update(**fields):
    return lambda manifest: manifest["kind_config"].update(fields)


def random_svf_pack(model, layers=(1,), n_edits=1, seed=0, prefix="e", scale=0.3, subject="S{}"):
    """A singular_scale pack of `n_edits` edits, each z = 1 + `scale` · N(0, 1) on the
    MLP output projection of every layer in `layers`, trained (as it were) on `model`'s SVD."""
    from hf_kedit.kinds.singular_scale import singular_decomposition, weight_matrix
    from hf_kedit.methods.builders import singular_scale_pack

    g = torch.Generator().manual_seed(seed)
    anatomy = anatomy_of(model)
    modules = [anatomy.mlp_out(layer) for layer in layers]
    spectra = {m: singular_decomposition(weight_matrix(model.get_submodule(m), model.get_submodule(m).weight))[1]
               for m in modules}
    edits, zs = [], {}
    for i in range(n_edits):
        eid = f"{prefix}{i}"
        edits.append(Edit(eid, subject.format(i), "The capital of {} is", f"T{seed}-{i}", "Old"))
        zs[eid] = {m: 1 + scale * torch.randn(len(S), generator=g) for m, S in spectra.items()}
    return singular_scale_pack(model, "random", {"seed": seed}, edits, zs, spectra)


def random_codebook_pack(model, ids, layer=1, radius=1.0, seed=0, prefix="e", scale=1.0, subject="S{}"):
    """A codebook pack at `layer` with one entry per row of `ids` [E, T]: its key the MLP
    output projection's input at the row's last token, a random value, and `radius`."""
    from hf_kedit.methods.builders import codebook_pack
    from hf_kedit.methods.memory.grace import projection_at

    g = torch.Generator().manual_seed(seed)
    module = model.get_submodule(anatomy_of(model).mlp_out(layer))
    edits, entries = [], {}
    for i, row in enumerate(ids):
        eid = f"{prefix}{i}"
        edits.append(Edit(eid, subject.format(i), "The capital of {} is", f"T{seed}-{i}", "Old"))
        key, own = projection_at(model, module, row[None], row.numel() - 1)
        entries[eid] = (key, torch.randn(own.shape, generator=g) * scale, radius)
    return codebook_pack(model, "random", {"seed": seed}, edits, layer, entries)
