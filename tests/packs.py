"""Random weight_delta packs for tests: the values do not matter, the plumbing does."""
import torch

from hf_kedit import Edit
from hf_kedit.anatomy import anatomy_of, linear_shape
from hf_kedit.methods import weight_delta_pack


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
