"""The README's Python examples run as written (in order, in one namespace), with no network."""
import re
from pathlib import Path

import pytest

from ddim_edu import solvers

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(monkeypatch):
    pytest.importorskip("diffusers")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 5  # quick start, diffusers UNet, pipeline, EDM denoiser, own method
    monkeypatch.setattr(solvers, "METHODS", dict(solvers.METHODS))  # an example registers a method
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as err:  # name the block in the failure
            raise AssertionError(f"README python block {i + 1} fails: {type(err).__name__}: {err}\n{block}") from err
    assert namespace["x_0"].shape == (1000, 2) and namespace["images"].shape == (4, 3, 8, 8)
