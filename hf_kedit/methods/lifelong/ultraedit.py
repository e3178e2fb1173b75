"""UltraEdit: one forward and backward per batch on the targets' cross-entropy,
the module inputs (keys) and output gradients at every token read, normalised
by running statistics that continue from batch to batch (the lifelong
normalisation), and per edited projection the closed-form ridge regression of
the pseudo-values −lr·‖k̂‖²·ĝ on the keys. Training-free, and subject-free: it
needs no subject position. Stored as a `weight_delta` pack in which each edit
owns the rows of its own tokens."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ...anatomy import anatomy_of, input_device, linear_shape
from ...batching import pad_id, padded
from ...errors import EditRequestError
from ...pack import Edit, EditPack
from ...pack.fingerprint import base_model_record
from ..builders import weight_delta_pack
from ..history import History
from ..requests import check_requests, edit_layers
from ..setting import setting

ULTRAEDIT = "UltraEdit's reference code (EasyEdit's hparams/ULTRAEDIT)"
LIFELONG = "docs/lifelong.md"
POSITIONS = ("all", "target")


@dataclass
class UltraEditConfig:
    """UltraEdit's settings: which projections of which layers, the step size of
    the pseudo-values, the ridge, and where the keys are read."""

    layers: tuple = setting((0.8, 0.97), "the edited layers: indices, or a (start, end) pair of relative depths",
                            f"{ULTRAEDIT}: layers 52-60 of Gemma-3-27B's 62 (0.84-0.97)")
    projections: tuple = setting(("mlp.gate_proj", "mlp.up_proj"), "the edited projections, as names inside a "
                                 "decoder layer", f"{ULTRAEDIT} (the MLP's gate and up projections)")
    lr: float = setting(1e-4, "the pseudo-values' step size: V = −lr ‖k̂‖² ĝ", "measured here on CounterFact cases "
                        "100-199: no setting tried keeps both efficacy and locality on the default model; this one "
                        f"loses least ({LIFELONG}#ultraedit); {ULTRAEDIT} has 1e-6 for Gemma-3-27B in half precision")
    ridge: float = setting(1.0, "λ in ΔW = Vᵀ K (KᵀK + λI)⁻¹", f"{ULTRAEDIT} (the identity); 100 and 1,000 "
                           f"measured here: worse ({LIFELONG}#ultraedit)")
    positions: str = setting("target", "where keys and gradients are read: \"all\" (every token of prompt and "
                             "target, UltraEdit's token: mask) or \"target\" (the positions that predict the "
                             "target's tokens)", f"measured here ({LIFELONG}#ultraedit); {ULTRAEDIT} reads all")
    chunk: int = setting(10, "edits per forward and backward", f"{ULTRAEDIT} (batch_size_once 10)")

    def __post_init__(self):
        """`EditRequestError` for settings UltraEdit cannot use (checks that need no model)."""
        for name in ("lr", "ridge"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not value > 0:
                raise EditRequestError(f"{name}={value!r}: give a positive number")
        if self.positions not in POSITIONS:
            raise EditRequestError(f"positions={self.positions!r}: give one of {', '.join(map(repr, POSITIONS))}")
        if type(self.chunk) is not int or self.chunk < 1:
            raise EditRequestError(f"chunk={self.chunk!r}: give a positive int, the edits per forward and backward")
        if not self.projections or not all(isinstance(p, str) and p for p in self.projections):
            raise EditRequestError(f"projections={self.projections!r}: give module names inside a decoder layer, "
                                   "e.g. (\"mlp.gate_proj\", \"mlp.up_proj\")")


class LifelongNorm(History):
    """UltraEdit's running normalisation of [key, gradient] features, one per
    weight shape (as its reference code keys them): for shape "out×in", the
    tensors "<shape>.count", "<shape>.mean" and "<shape>.m2" (the summed squared
    deviations). `ultraedit_edit(..., history=norm)` continues and extends it.

    Example:
        >>> norm = LifelongNorm()
        >>> first = ultraedit_edit(model, tokenizer, batch_1, history=norm)
        >>> load_edits(model, first)
        >>> second = ultraedit_edit(model, tokenizer, batch_2, history=norm)
        >>> norm.save("ultraedit-norm.safetensors")
    """

    kind = "ultraedit-norm"

    def update(self, shape: str, features: torch.Tensor) -> None:
        """Add rows [N, D] to the running mean and variance of `shape` (Chan et al.'s parallel update)."""
        x, names = features.double(), [f"{shape}.count", f"{shape}.mean", f"{shape}.m2"]
        empty = [torch.zeros(1), torch.zeros(x.shape[1]), torch.zeros(x.shape[1])]  # no rows seen yet
        seen, old_mean, old_m2 = (self.tensors.get(name, zero).double() for name, zero in zip(names, empty))
        n, mean = len(x), x.mean(0)
        total, delta = seen + n, mean - old_mean
        m2 = old_m2 + ((x - mean) ** 2).sum(0) + delta ** 2 * seen * n / total
        updated = (total, old_mean + delta * n / total, m2)
        self.tensors.update({name: t.float() for name, t in zip(names, updated)})

    def normalise(self, shape: str, features: torch.Tensor) -> torch.Tensor:
        count = self.tensors[f"{shape}.count"].to(features.device)
        std = (self.tensors[f"{shape}.m2"].to(features.device) / (count - 1).clamp(min=1)).sqrt()
        return (features - self.tensors[f"{shape}.mean"].to(features.device)) / (std + torch.finfo(std.dtype).eps)


def ultraedit_edit(model, tokenizer, requests: list[Edit], config: UltraEditConfig | None = None,
                   progress: bool = True, history: LifelongNorm | None = None) -> EditPack:
    """All requests in one UltraEdit update. With `history` (the `LifelongNorm` of
    the batches made before, whose packs are attached to `model`), the
    normalisation continues from there, and `history` is extended by this batch.

    Example:
        >>> pack = ultraedit_edit(model, tokenizer, edits)
    """
    check_requests(requests, subject_slot=False)
    config = config or UltraEditConfig()
    anatomy = anatomy_of(model)
    layers = edit_layers(config.layers, anatomy.num_layers)
    names = [f"{anatomy.layer(layer)}.{p}" for layer in layers for p in config.projections]
    missing = [n for n in names if not _is_module(model, n)]
    if missing:
        raise EditRequestError(f"{type(model).__name__} has no {missing[0]}: give projections that every decoder "
                               "layer has, e.g. (\"mlp.down_proj\",)")
    norm = history if history is not None else LifelongNorm()
    norm.check(base_model_record(model, names))
    keys, grads, owners = _read(model, tokenizer, requests, names, config, norm, progress)
    factors = {e.id: {} for e in requests}
    for name in names:
        shape = "×".join(map(str, linear_shape(model.get_submodule(name))))
        K = torch.cat(keys[name])  # [N, in]
        z = norm.normalise(shape, torch.cat([K, torch.cat(grads[name])], -1))
        k_hat, g_hat = z.split([K.shape[1], z.shape[1] - K.shape[1]], -1)
        values = -config.lr * (k_hat ** 2).sum(-1, keepdim=True) * g_hat  # [N, out]
        gram = K.double().T @ K.double() + config.ridge * torch.eye(K.shape[1], dtype=torch.float64)
        X = torch.linalg.solve(gram, K.double().T).T.float()  # [N, in]: ΔW = Vᵀ X
        for j, edit in enumerate(requests):
            rows = owners == j
            factors[edit.id][name] = (X[rows], values[rows].T.contiguous())
    norm.n_edits += len(requests)
    hyperparameters = {**asdict(config), "layers": layers, "edits_before": norm.n_edits - len(requests)}
    return weight_delta_pack(model, "ultraedit", hyperparameters, requests, factors)


def _is_module(model, name: str) -> bool:
    try:
        return linear_shape(model.get_submodule(name)) is not None
    except (AttributeError, TypeError, ValueError):
        return False


def _read(model, tokenizer, requests, names, config, norm, progress):
    """Per module, the keys and output gradients of each chunk's read tokens (CPU,
    float32), the normalisation updated chunk by chunk; and each row's request."""
    keys, grads, owners = {n: [] for n in names}, {n: [] for n in names}, []
    modules = {n: model.get_submodule(n) for n in names}
    device = input_device(model)
    captured, handles, frozen = {}, [], [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def hook(name):
        def read(module, args, out):
            captured[name] = [args[0].detach()]
            out.register_hook(lambda g: captured[name].append(g.detach()))
        return read

    for name, module in modules.items():
        module.weight.requires_grad_(True)  # outputs that need a gradient, and nothing before the first edited layer
        handles.append(module.register_forward_hook(hook(name)))
    bar = tqdm(total=len(requests), desc="ultraedit: reading gradients", unit="edit", disable=not progress)
    try:
        for start in range(0, len(requests), config.chunk):
            chunk = requests[start:start + config.chunk]
            prompts = [tokenizer(e.text).input_ids for e in chunk]
            targets = [tokenizer(" " + e.target_new.strip(), add_special_tokens=False).input_ids for e in chunk]
            ids, mask = padded([p + t for p, t in zip(prompts, targets)], pad_id(tokenizer), device)
            labels = torch.full_like(ids, -100)
            for row, (p, t) in enumerate(zip(prompts, targets)):
                labels[row, len(p):len(p) + len(t)] = torch.tensor(t, device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100).backward()
            # "target": the positions whose next token is scored (a target token's own
            # position predicts the token after it, and the last one's gradient is zero).
            scored = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
            read = mask.bool() if config.positions == "all" else scored
            owners.append((torch.arange(len(chunk), device=device)[:, None].expand_as(ids) + start)[read].cpu())
            for name, module in modules.items():
                k, g = captured[name]
                k, g = k[read].float().cpu(), g[read].float().cpu()
                shape = "×".join(map(str, linear_shape(module)))
                norm.update(shape, torch.cat([k, g], -1))
                keys[name].append(k)
                grads[name].append(g)
            bar.update(len(chunk))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        for module in modules.values():
            module.weight.requires_grad_(False)
            module.weight.grad = None
        for p in frozen:
            p.requires_grad_(True)
    return keys, grads, torch.cat(owners)
