"""The playground: a page in the browser to make an edit, compare the base model's
answers with the edited model's, and switch, load, save and push packs
(`kedit playground`; needs the `playground` extra, Gradio).

`session.py` holds what it does and needs no Gradio; `app.py` is the page.

Example:
    >>> from hf_kedit.playground import launch
    >>> launch("default", port=7860)
"""
from .app import build_app, launch
from .session import Answer, Playground

__all__ = ["Answer", "Playground", "build_app", "launch"]
