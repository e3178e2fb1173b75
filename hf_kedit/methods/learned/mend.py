"""MEND: an editor network trained once per base model (`train_mend`) maps each
edit's gradient at the MLP output projections of the last layers to a low-rank
weight update (`mend_edit`: one forward and backward per edit, no optimisation),
stored as an ordinary `weight_delta` pack. Training teaches the editor that the
edited model must give the new target on the edit's prompt and its paraphrases
(cross-entropy) and keep its distributions on unrelated prompts (KL), MEND's
edit and locality losses (docs/methods.md)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ...anatomy import anatomy_of, execution_device
from ...batching import pad_id, padded
from ...errors import EditRequestError
from ...kinds.weight_delta import deltas_applied
from ...pack import Edit, EditPack
from ...progress import StepBar
from ..builders import weight_delta_pack
from ..requests import check_requests, edit_layers
from ..setting import NOT_TUNED, setting
from ..teacher_forcing import frozen, teacher_forced
from .editor import MENDEditor, edit_gradients, shape_key
from .store import cached_editor_dir, load_editor, save_editor

MEND_CODE = "MEND's paper and code (eric-mitchell/mend)"
TRIALS = "chosen here on 300-step trials on the default model (docs/methods.md#mend-methodslearned)"
LAYERS_HELP = "the layers whose MLP output projection the editor edits: indices, negative ones counted from the last"


@dataclass
class MENDConfig:
    """Which trained editor `mend_edit` uses."""

    layers: tuple = setting((-3, -2, -1), LAYERS_HELP, f"{MEND_CODE}: the last three layers' MLPs")
    editor_source: str | None = setting(None, "a folder or Hub repo id holding an editor (save_editor, "
                                        "push_editor); None: the one train_mend left in the local cache",
                                        "none: the local cache")


@dataclass
class MENDTrainingConfig:
    """How `train_mend` trains an editor."""

    layers: tuple = setting((-3, -2, -1), LAYERS_HELP, f"{MEND_CODE}: the last three layers' MLPs")
    rank: int = setting(128, "rank of each editor layer's weight", f"chosen here, not tuned ({MEND_CODE}: 1920 "
                        "for GPT-2 XL's 6400-wide inputs)")
    hidden_layers: int = setting(1, "editor layers with an activation, before the last (linear) one",
                                 f"{MEND_CODE} (n_hidden)")
    steps: int = setting(2000, "training steps, one training edit each", NOT_TUNED)
    lr: float = setting(1e-3, "Adam's step size on the editor network", f"{TRIALS}: 1e-4 lowers the edit loss "
                        "to 2.67 in 300 steps, 1e-3 to 0.95")
    lr_lr: float = setting(1e-4, "Adam's step size on the per-weight edit step sizes", f"{MEND_CODE} (lr_lr)")
    edit_lr: float = setting(1e-4, "the edit step sizes' starting value", f"{MEND_CODE} (edit_lr)")
    c_edit: float = setting(0.3, "weight of the edit loss (target cross-entropy after the edit)",
                            f"{TRIALS}: after 300 steps edit/locality loss 2.36/0.16 at 0.1 ({MEND_CODE}'s cedit), "
                            "0.95/0.36 at 0.3, 0.49/0.58 at 1")
    c_loc: float = setting(1.0, "weight of the locality loss (KL on the unrelated prompts)", f"{MEND_CODE} (cloc)")
    norm_edits: int = setting(100, "training edits whose gradients give the editor's input normalisation",
                              "chosen here, not tuned (MEND keeps running statistics)")
    grad_clip: float = setting(100.0, "largest norm of the editor's gradient in a step (clipped above it)",
                               f"{MEND_CODE} (grad_clip)")
    val_edits: int = setting(30, "the first training edits, held out: the editor of the lowest loss on them is "
                             "the one kept; 0 keeps the last", "chosen here, not tuned")
    val_every: int = setting(100, "steps between two validations", "chosen here, not tuned")
    seed: int = setting(0, "the seed of the editor's initialisation and the order of the training edits",
                        NOT_TUNED)

    def __post_init__(self):
        for name in ("rank", "steps", "norm_edits", "val_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise EditRequestError(f"{name}={getattr(self, name)!r}: give a whole number of at least 1")
        if not (isinstance(self.val_edits, int) and self.val_edits >= 0):
            raise EditRequestError(f"val_edits={self.val_edits!r}: give a whole number, 0 for no validation")
        for name in ("lr", "lr_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise EditRequestError(f"{name}={getattr(self, name)!r}: give a positive number")


@dataclass
class TrainingEdit:
    """One edit to train an editor on: `rephrases` (prompts with the subject filled
    in) must get the new target too, `unrelated` prompts keep their distributions.

    Example:
        >>> TrainingEdit(edit, ["Where Danielle Darrieux is from, people speak"], ["Michel Rocard speaks"])
    """

    edit: Edit
    rephrases: list[str] = field(default_factory=list)
    unrelated: list[str] = field(default_factory=list)


def mend_targets(model, layers) -> list[str]:
    """The MLP output projections of `layers` (indices, negative ones from the last)."""
    anatomy = anatomy_of(model)
    n = anatomy.num_layers
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(x, int) for x in layers):
        layers = [x + n if -n <= x < 0 else x for x in layers]
    return [anatomy.mlp_out(layer) for layer in edit_layers(layers, n)]


def mend_edit(model, tokenizer, requests: list[Edit], config: MENDConfig | None = None,
              progress: bool = True) -> EditPack:
    """Edit with a trained MEND editor: each request's gradient, mapped by the editor,
    is its update; returns a `weight_delta` pack (one edit's factors of rank = its tokens).

    Example:
        >>> train_mend(model, tokenizer, training_edits)   # once per base model
        >>> pack = mend_edit(model, tokenizer, [Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English")])
    """
    check_requests(requests, subject_slot=False)
    config = config or MENDConfig()
    targets = mend_targets(model, config.layers)
    editor, manifest = load_editor(model, config.editor_source, targets)
    device = execution_device(model, targets[0])
    factors = {}
    for edit in StepBar(requests, 1, "mend: editing", disable=not progress):
        ids, labels, _ = teacher_forced(tokenizer, edit.text, edit.target_new, device)
        grads, _ = edit_gradients(model, targets, ids, labels)
        with torch.no_grad():
            factors[edit.id] = editor.factors(grads)
    hyperparameters = {**asdict(config), "layers": list(config.layers),
                       "editor": {"sha256": manifest["sha256"], "training": manifest["training"]}}
    return weight_delta_pack(model, "mend", hyperparameters, requests, factors)


def train_mend(model, tokenizer, examples: list[TrainingEdit], config: MENDTrainingConfig | None = None,
               progress: bool = True, data_name: str = "") -> MENDEditor:
    """Train a MEND editor for `model` on `examples` and keep it in the local cache,
    where `mend_edit` finds it (`cached_editor_dir(model, editor.targets)`; copy it
    with `save_editor`, share it with `push_editor`). The first `config.val_edits`
    examples are held out, and the editor kept is the one of the lowest loss on
    them. The model is left as it was.

    Example:
        >>> editor = train_mend(model, tokenizer, [TrainingEdit(edit, rephrases, unrelated), ...])
    """
    config = config or MENDTrainingConfig()
    if not examples:
        raise EditRequestError("train_mend needs training edits; give a list of TrainingEdit")
    if len(examples) <= config.val_edits:
        raise EditRequestError(f"train_mend holds out the first {config.val_edits} edits for validation and was "
                               f"given {len(examples)}; give more training edits or set val_edits lower")
    check_requests([ex.edit for ex in examples], subject_slot=False)
    targets = mend_targets(model, config.layers)
    torch.manual_seed(config.seed)
    device = execution_device(model, targets[0])
    validation, examples = examples[:config.val_edits], examples[config.val_edits:]
    editor = MENDEditor.for_model(model, targets, config.rank, config.hidden_layers, config.edit_lr).to(device)
    _set_normalisation(model, tokenizer, editor, examples[:config.norm_edits], device)
    optimizer = torch.optim.Adam([{"params": list(editor.nets.parameters()), "lr": config.lr},
                                  {"params": [editor.edit_lr], "lr": config.lr_lr}])
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
    started, recent, skipped, history, best = time.perf_counter(), [], 0, [], None

    def validate(step):
        nonlocal best
        loss = _validation_loss(model, tokenizer, editor, validation, config, device, on_edit=lambda: bar.update(1))
        history.append({"step": step, "loss": round(loss, 4)})
        if best is None or loss < best[1]:  # NaN never wins
            best = (step, loss, {k: v.detach().clone() for k, v in editor.state_dict().items()})

    # The bar counts training edits and validation edits alike (each about one forward
    # and backward), so validating every val_every steps does not make the estimate jump.
    validations = (1 + -(-config.steps // config.val_every)) if validation else 0
    bar = tqdm(total=config.steps + validations * len(validation), desc="mend: training the editor",
               unit="edit", disable=not progress)
    if validation:
        validate(0)
    for step in range(config.steps):
        losses = _training_step(model, tokenizer, editor, examples[order[step % len(order)]], device)
        loss = config.c_edit * losses["edit"] + config.c_loc * losses["loc"]
        if torch.isfinite(loss):  # one overflowing edit must not poison Adam's moments
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(editor.parameters(), config.grad_clip)
            optimizer.step()
        else:
            skipped += 1
        recent = (recent + [{k: v.item() for k, v in losses.items()}])[-100:]
        if validation and ((step + 1) % config.val_every == 0 or step + 1 == config.steps):
            validate(step + 1)
        postfix = {k: f"{sum(r[k] for r in recent) / len(recent):.3f}" for k in recent[0]}
        bar.set_postfix({**postfix, **({"val": f"{history[-1]['loss']:.3f}"} if history else {})}, refresh=False)
        bar.update(1)
    bar.close()
    if best is not None:
        editor.load_state_dict(best[2])
    training = {"data": data_name, "edits": len(examples), **asdict(config), "layers": list(config.layers),
                "seconds": round(time.perf_counter() - started, 1), "skipped_steps": skipped,
                "last_100_steps": {k: round(sum(r[k] for r in recent) / len(recent), 4) for k in recent[0]},
                "validation": history, "kept_step": best[0] if best else config.steps,
                "learned_edit_lr": [round(x, 8) for x in editor.edit_lr.tolist()]}
    save_editor(editor, cached_editor_dir(model, targets), model, training)
    return editor


def _validation_loss(model, tokenizer, editor: MENDEditor, examples: list[TrainingEdit],
                     config: MENDTrainingConfig, device, on_edit=lambda: None) -> float:
    """The training loss, averaged over held-out edits, with no gradient for the editor."""
    total = 0.0
    with torch.no_grad():  # edit_gradients turns autograd back on for the model's own gradient
        for ex in examples:
            losses = _training_step(model, tokenizer, editor, ex, device)
            total += (config.c_edit * losses["edit"] + config.c_loc * losses["loc"]).item()
            on_edit()
    return total / len(examples)


def _set_normalisation(model, tokenizer, editor: MENDEditor, examples: list[TrainingEdit], device) -> None:
    rows = {key: ([], []) for key in editor.nets}
    for ex in examples:
        ids, labels, _ = teacher_forced(tokenizer, ex.edit.text, ex.edit.target_new, device)
        grads, _ = edit_gradients(model, editor.targets, ids, labels)
        for i, module in enumerate(editor.targets):
            us, deltas = rows[shape_key(*editor.shapes[i])]
            us.append(grads[module][0]), deltas.append(grads[module][1])
    for key, (us, deltas) in rows.items():
        editor.nets[key].set_normalisation(torch.cat(us), torch.cat(deltas))


def _training_step(model, tokenizer, editor: MENDEditor, ex: TrainingEdit, device) -> dict[str, torch.Tensor]:
    """One training edit: its gradient on the unedited model (the same forward gives
    the unrelated prompts' distributions), the editor's update, and the edit and
    locality losses of the model with that update."""
    pad = pad_id(tokenizer)
    scored = [teacher_forced(tokenizer, prompt, ex.edit.target_new, device)[:2]
              for prompt in [ex.edit.text, *ex.rephrases]]
    unrelated = [tokenizer(p).input_ids for p in ex.unrelated]
    ids, mask = padded([scored[0][0][0].tolist(), *unrelated], pad, device)
    grads, before = edit_gradients(model, editor.targets, ids, scored[0][1], mask)
    ids, mask = padded([row[0].tolist() for row, _ in scored] + unrelated, pad, device)
    with frozen(model), deltas_applied(model, editor.factors(grads)):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    edit_loss = torch.stack([F.cross_entropy(logits[i, :labels.shape[1] - 1][labels[0, 1:] != -100],
                                             labels[0, 1:][labels[0, 1:] != -100])
                             for i, (_, labels) in enumerate(scored)]).mean()
    if not unrelated:
        return {"edit": edit_loss, "loc": edit_loss.new_zeros(())}
    p0 = F.log_softmax(torch.cat([before[1 + i, :len(row)] for i, row in enumerate(unrelated)]).float(), -1)
    now = F.log_softmax(torch.cat([logits[len(scored) + i, :len(row)] for i, row in enumerate(unrelated)]), -1)
    return {"edit": edit_loss, "loc": (p0.exp() * (p0 - now)).sum(-1).mean()}
