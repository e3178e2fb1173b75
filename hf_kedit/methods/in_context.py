"""Facts stated in the prompt: the context the `icl` baseline puts before each
prompt of a case, and the context `distill`'s teacher reads."""
from __future__ import annotations

from ..pack import Edit

FACT_CONTEXT = "New Fact: {fact}\nPrompt: "


def fact_context(edits: list[Edit]) -> str:
    """The edits as facts before a prompt, one line each.

    Example:
        >>> fact_context([Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English")])
        'New Fact: The mother tongue of Danielle Darrieux is English.\\nPrompt: '
    """
    return "".join(FACT_CONTEXT.format(fact=f"{e.text} {e.target_new}.") for e in edits)
