"""README.md's Quick start is code a newcomer pastes: it must run as written (on this CPU here, on CUDA where one
is present) and compute what it says."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's Quick start has no python block"
    return match.group(1)


def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves model-int4.pt in the working directory
    scope: dict = {}
    exec(compile(_quick_start(), str(README) + ":Quick start", "exec"), scope)
    # the shapes its comments promise, and outputs that are numbers
    assert scope["out"].shape == (2, 1, 32, 128) and torch.isfinite(scope["out"]).all()
    assert scope["y"].shape == (1, 14336) and torch.isfinite(scope["y"]).all()
    assert scope["normed"].shape == scope["h"].shape == (2, 16, 4096)
    assert scope["act"].shape == (2, 16, 14336)
    assert scope["q"].shape == (1, 1, 128) and scope["k"].shape == scope["v"].shape == (1, 1, 64)
    assert [len(t) for t in scope["new_tokens"]] == [8, 8]
    assert (tmp_path / "model-int4.pt").exists()
