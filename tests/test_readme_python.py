"""The README's Python section runs as written (issue 30)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_section_code() -> str:
    text = README.read_text()
    section = text[text.index("## Use it from Python"):text.index("## Use it from YAML")]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_the_readme_python_section_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_section_code(), str(README), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.split()[-2:] == ["jumprelu", "200704"]
    assert (tmp_path / "runs" / "python-mutual-choice" / "cfg.json").is_file()
