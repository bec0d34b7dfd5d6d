"""The README's usage examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import streamattn as sa

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples may write files (stream.pt)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    if index == 0:
        assert "[3001, 3001] [1024, 1024]" in printed and "[3008, 3003]" in printed
    elif "layer_policies=" in BLOCKS[index]:
        want = [sa.SinkWindow(4, 28), sa.SinkWindow(0, 16), sa.SinkWindow(0, 16), sa.SinkWindow(4, 60)]
        assert printed.splitlines() == [str(want), "sdpa"]
    elif "StreamingTranscriber(" in BLOCKS[index]:
        lines = printed.strip().splitlines()
        assert len(lines) > 10 and lines[-1].startswith("It was the best of times.")
    elif "Stream(" in BLOCKS[index]:
        lines = printed.strip().splitlines()
        assert lines[0].startswith("torch.Size([") and lines[0].endswith("True")
        assert int(lines[-1]) > 20  # tokens the cache has seen after generate
    else:
        assert float(printed.split()[-1]) < 1e-5  # deviation printed by the example
