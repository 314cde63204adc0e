"""The README's library example runs as printed (a newcomer pastes it first)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_example_runs_as_printed():
    text = README.read_text()
    section = text[text.index("## The library"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "qcsbm.NCSNpp(" in code and "bits_per_dim" in code
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["x"].shape == (4, 3, 32, 32) and torch.isfinite(scope["x"]).all()
    assert torch.isfinite(scope["bpd"]).all() and torch.isfinite(scope["asym"]).all()
