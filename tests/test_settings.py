"""Every method setting documents itself (what it does, where its default comes
from), and docs/settings.md is written from those fields."""
import re
from dataclasses import fields
from pathlib import Path

import pytest

from hf_kedit.methods import METHODS, TRAINING, RequestConfig
from hf_kedit.methods.setting import REGENERATE, settings_page

ROOT = Path(__file__).resolve().parents[1]


CONFIGS = {**{name: config for name, (_, config) in METHODS.items()},
           **{f"{name} training": config for name, config in TRAINING.items()}, "every method": RequestConfig}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_setting_says_what_it_does_and_where_its_default_comes_from(name):
    undocumented = [f.name for f in fields(CONFIGS[name])
                    if not (f.metadata.get("help", "").strip() and f.metadata.get("source", "").strip())]
    assert undocumented == []


def test_the_pages_a_source_cites_exist():
    cited = {m for config in CONFIGS.values() for f in fields(config)
             for m in re.findall(r"docs/[\w-]+\.md", f.metadata.get("source", ""))}
    assert cited and [page for page in sorted(cited) if not (ROOT / page).is_file()] == []


def test_the_settings_page_is_written_from_the_configs():
    assert (ROOT / "docs" / "settings.md").read_text() == settings_page(METHODS, TRAINING, RequestConfig), f"regenerate: {REGENERATE}"
