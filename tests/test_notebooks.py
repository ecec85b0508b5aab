"""The committed notebooks as a reader opens them: run in full, every figure shown, no machine's paths.

nbval (over notebooks/) checks that the notebooks run and that their checked outputs hold; these tests
check what nbval cannot see, the committed outputs themselves.
"""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
COMMITTED = sorted(NOTEBOOKS.rglob("*.ipynb"))
COMMITTED = [p for p in COMMITTED if ".ipynb_checkpoints" not in p.parts]
MAKES_A_FIGURE = re.compile(r"\bplt\.(subplots|subplot_mosaic|figure|imshow|plot|show)\(")
MACHINE_PATH = re.compile(r"(/work/|/tmp/|/root/|/home/|/Users/|[A-Z]:\\\\Users)")


def code_cells(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            yield index, "".join(cell["source"]), cell.get("outputs", [])


def text_of(output) -> str:
    if "text" in output:
        return "".join(output["text"])
    data = output.get("data", {})
    return "".join("".join(v) if isinstance(v, list) else str(v) for k, v in data.items() if k.startswith("text/"))


def test_there_are_notebooks():
    assert len(COMMITTED) >= 7, [p.name for p in COMMITTED]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(NOTEBOOKS)))
def test_committed_notebook_was_run_in_full_with_every_figure_shown(path):
    cells = list(code_cells(path))
    not_run = [i for i, source, outputs in cells if source.strip() and not outputs and MAKES_A_FIGURE.search(source)]
    figures_missing = []
    for index, source, outputs in cells:
        if MAKES_A_FIGURE.search(source):  # a plotting helper belongs in the cell that draws with it
            if not any("image/png" in o.get("data", {}) for o in outputs):
                figures_missing.append(index)
    errors = [i for i, _, outputs in cells for o in outputs if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: cells {errors} hold an error in their committed output"
    assert not figures_missing, (f"{path.name}: cells {figures_missing} make a figure but the committed notebook "
                                 f"shows none (not run, or the figure went to a non-interactive backend)"
                                 + (f"; cells {not_run} have no output at all" if not_run else ""))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(NOTEBOOKS)))
def test_committed_outputs_name_no_machine_path(path):
    hits = [(i, m.group(0)) for i, _, outputs in code_cells(path) for o in outputs
            for m in [MACHINE_PATH.search(text_of(o))] if m]
    assert not hits, f"{path.name}: outputs name paths of the machine that ran them (cell, path): {hits}"
