"""The README's ten-line example runs as written and does what it says."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example(heading: str) -> str:
    section = README.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.default_model
def test_the_ten_line_example_makes_saves_and_loads_a_pack(tmp_path, monkeypatch, capsys):
    code = example("## Make a pack in ten lines")
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip().startswith("English")
    assert (tmp_path / "my-edits" / "kedit_config.json").is_file()
