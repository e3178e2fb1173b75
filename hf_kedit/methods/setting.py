"""Method settings that document themselves: each field of a method's config
says, beside it, what it does and where its default comes from (a paper or
its reference code, a measurement here with the page that shows it, or a
choice made here), as PEFT's configs carry `metadata={"help": ...}`. The
settings page, docs/settings.md, is written from them.

Example:
    >>> @dataclass
    ... class MyConfig:
    ...     steps: int = setting(20, "most optimisation steps", "ROME's code (v_num_grad_steps)")
"""
from __future__ import annotations

from dataclasses import field, fields

NOT_TUNED = "chosen here, not tuned"
REGENERATE = ("python -c \"from hf_kedit.methods import METHODS, TRAINING, RequestConfig; from "
              "hf_kedit.methods.setting import settings_page; open('docs/settings.md', 'w').write("
              "settings_page(METHODS, TRAINING, RequestConfig))\"")


def setting(default, help: str, source: str):
    """A config field with its `help` (what it does) and `source` (where its default comes from)."""
    return field(default=default, metadata={"help": help, "source": source})


def settings_table(config_class) -> str:
    """A Markdown table of `config_class`'s fields: name, default, help and source."""
    rows = ["| setting | default | what it does | where the default comes from |", "|---|---|---|---|"]
    for f in fields(config_class):
        rows.append(f"| `{f.name}` | `{_cell(repr(f.default))}` | {_cell(f.metadata.get('help', ''))} | "
                    f"{_cell(f.metadata.get('source', ''))} |")
    return "\n".join(rows)


def settings_page(methods: dict, training: dict | None = None, every=None) -> str:
    """docs/settings.md: the settings `every` method takes (a config class), one table
    per method of `methods` (name -> (edit function, config class)), and one per
    config of `training` (name -> config class of a method's training)."""
    parts = ["# Method settings", "",
             "Every method's settings, with their defaults and where each default comes from. Written from the",
             "configs themselves (`hf_kedit.methods.setting`); regenerate with",
             f"`{REGENERATE}`.",
             "Give them as the config's fields (`ROMEConfig(lr=1.0)`), as `make_pack(name, ..., settings)`, or",
             "as `--set key=value` on the command line.", ""]
    if every is not None:
        parts += [f"## every method ({every.__name__})", "", settings_table(every), ""]
    for name, (_, config_class) in sorted(methods.items()):
        parts += [f"## `{name}` ({config_class.__name__})", "", settings_table(config_class), ""]
    for name, config_class in sorted((training or {}).items()):
        parts += [f"## `{name}` training ({config_class.__name__})", "", settings_table(config_class), ""]
    return "\n".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
