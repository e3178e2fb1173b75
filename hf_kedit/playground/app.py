"""The playground's page: Gradio widgets wired to a `Playground`.

Every event runs one `Playground` method and then redraws what it may have
changed; a failure is shown on the page as its error's type and message (the
session leaves the model as it was), never as a traceback.
"""
from __future__ import annotations

import json
import logging
from html import escape

from ..demo import DEMO_EDIT, NEIGHBOUR
from ..errors import KeditError, MissingDependencyError
from ..methods import METHODS
from ..methods.setting import settings_table
from .session import Playground, default_settings, parse_settings_json

DEFAULT_METHOD = "rome"
DEFAULT_PROMPTS = f"{DEMO_EDIT.subject}'s mother tongue is\n{NEIGHBOUR}"
INSTALL_HINT = "pip install 'hf-kedit[playground]'"
# The errors bad input raises (hf_kedit's typed errors, missing files and names, Hub errors): shown, not logged loudly.
EXPECTED = (KeditError, ValueError, KeyError, OSError)
log = logging.getLogger(__name__)


def _gradio():
    try:
        import gradio
    except ImportError as e:
        raise MissingDependencyError(f"the playground needs Gradio, which is not installed ({e}): "
                                     f"run `{INSTALL_HINT}`") from None
    return gradio


def shown(error: Exception) -> str:
    """How an error reads on the page: its type and its message."""
    return f"**{type(error).__name__}**: {escape(str(error))}"


def answers_table(answers, target: str) -> str:
    """The answers side by side, as a Markdown table."""
    if not answers:
        return "_No prompts to read._"
    rows = [f"| prompt | base model | with packs | p({escape(target)}) base | p({escape(target)}) with packs |",
            "|---|---|---|---|---|"]
    rows += [f"| {_cell(a.prompt)} | {_cell(a.base)} | {_cell(a.edited)} | {a.base_p:.3g} | {a.edited_p:.3g} |"
             for a in answers]
    return "\n".join(rows)


def packs_table(session: Playground) -> str:
    if not session.packs:
        return "_No packs yet: make one above or load one._"
    attached = set(session.attached())
    rows = ["| pack | kind | method | edits | attached |", "|---|---|---|---|---|"]
    rows += [f"| {_cell(name)} | {pack.kind} | {pack.method} | "
             f"{', '.join(_cell(f'{e.id}: {e.text} → {e.target_new}') for e in pack.edits)} | "
             f"{'yes' if name in attached else 'no'} |" for name, pack in session.packs.items()]
    return "\n".join(rows)


def _cell(text: str) -> str:
    return escape(text).replace("|", "\\|").replace("\n", " ") or " "


def build_app(session: Playground, model_name: str = "default"):
    """The playground's `gradio.Blocks` for `session`.

    Example:
        >>> app = build_app(Playground(model, tokenizer))
        >>> app.launch()
    """
    gr = _gradio()
    names = sorted(METHODS)

    with gr.Blocks(title="hf_kedit playground", analytics_enabled=False) as app:
        gr.Markdown(f"# hf_kedit playground\nModel: `{escape(model_name)}`. Make an edit, compare the answers of "
                    "the base model and of the model with its packs, switch packs on and off, load, save and push "
                    "them.")
        status = gr.Markdown("Ready.", elem_id="status")
        with gr.Row():
            with gr.Column():
                gr.Markdown("## Edit a fact")
                subject = gr.Textbox(DEMO_EDIT.subject, label="subject", elem_id="subject")
                prompt = gr.Textbox(DEMO_EDIT.prompt, label="prompt ({} is where the subject goes)",
                                    elem_id="prompt")
                target_new = gr.Textbox(DEMO_EDIT.target_new, label="new target", elem_id="target-new")
                target_true = gr.Textbox(DEMO_EDIT.target_true, label="old target (optional)", elem_id="target-true")
                method = gr.Dropdown(names, value=DEFAULT_METHOD, label="method", elem_id="method")
                settings = gr.Textbox(settings_text(DEFAULT_METHOD), label="settings (JSON; the defaults shown)",
                                      lines=6, max_lines=12, elem_id="settings")
                with gr.Accordion("What the settings do", open=False):
                    settings_help = gr.Markdown(settings_table(METHODS[DEFAULT_METHOD][1]))
                newest_wins = gr.Checkbox(False, label="the newest edit of a fact wins over attached ones",
                                          elem_id="newest-wins")
                make = gr.Button("Make pack", variant="primary", elem_id="make")
            with gr.Column():
                gr.Markdown("## Answers")
                prompts = gr.Textbox(DEFAULT_PROMPTS, label="more prompts (one per line; the edit prompt comes first)",
                                     lines=3, elem_id="prompts")
                compare = gr.Button("Compare", elem_id="compare")
                answers = gr.Markdown(elem_id="answers")
        gr.Markdown("## Packs")
        switches = gr.CheckboxGroup([], label="attached (untick to detach)", elem_id="switches")
        disable_all = gr.Checkbox(False, label="disable all packs (stack_of(model).disable())", elem_id="disable-all")
        packs = gr.Markdown(packs_table(session), elem_id="packs")
        with gr.Row():
            source = gr.Textbox(label="load: a pack folder or a Hub repo id", elem_id="source", scale=3)
            revision = gr.Textbox(label="revision (optional)", elem_id="revision", scale=1)
            load = gr.Button("Load pack", elem_id="load", scale=1)
        with gr.Row():
            chosen = gr.Dropdown([], label="pack", elem_id="chosen", allow_custom_value=False)
            edit_id = gr.Dropdown([], label="edit", elem_id="edit-id")
            remove_edit = gr.Button("Remove edit", elem_id="remove-edit")
            forget = gr.Button("Forget pack", elem_id="forget")
        with gr.Row():
            folder = gr.Textbox(label="save into folder", elem_id="folder", scale=3)
            overwrite = gr.Checkbox(False, label="overwrite", elem_id="overwrite", scale=1)
            save = gr.Button("Save pack", elem_id="save", scale=1)
        with gr.Row():
            repo_id = gr.Textbox(label="push to Hub repo (user/name)", elem_id="repo-id", scale=2)
            branch = gr.Textbox(label="branch (optional)", elem_id="branch", scale=1)
            private = gr.Checkbox(False, label="private", elem_id="private", scale=1)
            push = gr.Button("Push pack", elem_id="push", scale=1)
        with gr.Accordion("Model card", open=True):
            card = gr.Markdown(elem_id="card")
        with gr.Accordion("Causal tracing of the edit prompt (base model)", open=False):
            with gr.Row():
                trace_kind = gr.Radio(["hidden", "mlp"], value="hidden", label="restore", elem_id="trace-kind")
                trace_button = gr.Button("Trace", elem_id="trace")
            heatmap = gr.Image(label="heatmap", type="filepath", elem_id="heatmap")

        pack_view = [status, switches, packs, chosen, edit_id, card]

        def view(message: str, pick: str | None = None):
            """`message` and everything that shows the held packs."""
            held = list(session.packs)
            pick = pick if pick in session.packs else (held[-1] if held else None)
            edits = [e.id for e in session.packs[pick].edits] if pick else []
            return (message, gr.update(choices=held, value=session.attached()), packs_table(session),
                    gr.update(choices=held, value=pick), gr.update(choices=edits, value=edits[0] if edits else None),
                    session.card(pick) if pick else "")

        def attempt(action, done, pick=None):
            """Run `action`; the view with `done(result)` or with the error shown."""
            try:
                result = action()
            except Exception as e:  # every failure reaches the page as its type and message
                # A user's mistake is a typed error; anything else is a bug, and its traceback goes to the terminal.
                log.log(logging.INFO if isinstance(e, EXPECTED) else logging.ERROR, "playground: %s", e,
                        exc_info=True)
                return view(shown(e), pick)
            return view(done(result), result if isinstance(result, str) and result in session.packs else pick)

        def on_method(name):
            return settings_text(name), settings_table(METHODS[name][1])

        def on_make(name, settings_json, subj, prompt_text, new, old, newest, progress=gr.Progress(track_tqdm=True)):
            return attempt(lambda: session.make(name, subj, prompt_text, new, old, parse_settings_json(settings_json),
                                                newest_wins=newest),
                           lambda made: f"Made and attached pack **{made}**.")

        def on_compare(subj, prompt_text, new, extra):
            try:
                edit_prompt = prompt_text.replace("{}", subj.strip())
                return answers_table(session.answers([edit_prompt, *extra.splitlines()], new), new.strip())
            except Exception as e:
                return shown(e)

        def on_switch(on_names, newest):
            def apply():
                for name in session.packs.copy():
                    session.switch(name, name in on_names, newest_wins=newest)
            return attempt(apply, lambda _: "Attached: " + (", ".join(session.attached()) or "none") + ".")

        def on_disable(flag):
            session.all_disabled = flag
            return "All packs disabled: the right column is the base model." if flag else "Packs enabled."

        def on_load(src, rev, newest):
            return attempt(lambda: session.load(src, rev, newest_wins=newest),
                           lambda name: f"Loaded and attached pack **{escape(name)}**.")

        def on_remove_edit(name, eid):
            return attempt(lambda: session.remove_edit(name, eid), lambda _: f"Removed edit {eid} of {escape(name)}.",
                           pick=name)

        def on_forget(name):
            return attempt(lambda: session.forget(name), lambda _: f"Forgot pack {escape(name)}.")

        def on_save(name, out, replace):
            return attempt(lambda: session.save(name, out, overwrite=replace),
                           lambda path: f"Saved pack {escape(name)} into `{escape(str(path))}`.", pick=name)

        def on_push(name, repo, ref, hidden):
            return attempt(lambda: session.push(name, repo, ref, hidden),
                           lambda sha: f"Pushed pack {escape(name)} to {escape(repo)} at commit `{sha}`.", pick=name)

        def on_pick(name):
            return attempt(lambda: None, lambda _: f"Pack {escape(name)}." if name else "Ready.", pick=name)

        def on_trace(subj, prompt_text, kind):
            try:
                return str(session.trace(prompt_text, subj.strip(), kind)), "Traced the edit prompt."
            except Exception as e:
                return None, shown(e)

        read = dict(fn=on_compare, inputs=[subject, prompt, target_new, prompts], outputs=answers)
        # A pack's progress shows once, under the status line, not over every widget the event redraws.
        shown_once = dict(outputs=pack_view, show_progress_on=status)
        method.change(on_method, method, [settings, settings_help])
        make.click(on_make, [method, settings, subject, prompt, target_new, target_true, newest_wins],
                   **shown_once).then(**read)
        compare.click(**read)
        switches.input(on_switch, [switches, newest_wins], **shown_once).then(**read)
        disable_all.input(on_disable, disable_all, status).then(**read)
        load.click(on_load, [source, revision, newest_wins], **shown_once).then(**read)
        remove_edit.click(on_remove_edit, [chosen, edit_id], **shown_once).then(**read)
        forget.click(on_forget, chosen, **shown_once).then(**read)
        save.click(on_save, [chosen, folder, overwrite], **shown_once)
        push.click(on_push, [chosen, repo_id, branch, private], **shown_once)
        chosen.input(on_pick, chosen, **shown_once)
        trace_button.click(on_trace, [subject, prompt, trace_kind], [heatmap, status])
        app.load(**read)
    return app


def launch(model_name: str = "default", host: str = "127.0.0.1", port: int | None = None, device_map=None,
           offload_folder=None) -> None:
    """Load `model_name` (with `device_map` and `offload_folder`, as `load_model`
    takes them) and serve its playground until interrupted.

    Example:
        >>> launch("default", port=7860)   # then open http://127.0.0.1:7860
    """
    from ..models import load_model

    _gradio()  # fail before loading the model when Gradio is missing
    model, tokenizer = load_model(model_name, device_map=device_map, offload_folder=offload_folder)
    app = build_app(Playground(model, tokenizer), model_name)
    # One event at a time: they all share one model.
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, ssr_mode=False, show_error=False)


def settings_text(method: str) -> str:
    """The method's defaults as JSON, one setting a line."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in default_settings(method).items()]
    return "{\n" + ",\n".join(lines) + "\n}"
