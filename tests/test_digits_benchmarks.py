"""The digits benchmarks (Table 1, Table 2 with consistency and interpolation, the Eq 14 solvers on the digits
UNet) in their --smoke form: each runs in seconds, writes its Markdown and figures into the folder given with
--out, and reports only finite numbers."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

pytest.importorskip("sklearn", reason="the digits need scikit-learn (the digits extra)")
threadpoolctl = pytest.importorskip("threadpoolctl")

NOT_FINITE = re.compile(r"\b(nan|inf|infinity)\b", re.IGNORECASE)
NUMBER = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?")


def run_script(name: str, out: Path, *extra: str) -> Path:
    """``main(["--smoke", "--out", out, ...])`` of ``benchmarks/<name>.py``, leaving the thread settings as they were."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        with threadpoolctl.threadpool_limits(limits=None):  # restores the BLAS threads the script sets
            return module.main(["--smoke", "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)


def check_report(md: Path, figures: list[str], tables: int):
    text = md.read_text()
    assert "SMOKE RUN" in text
    assert not NOT_FINITE.search(text), NOT_FINITE.search(text)
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and NUMBER.search(line)]
    assert len(table_rows) >= tables, text
    for name in figures:
        png = md.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name


def test_table1_smoke_writes_both_tau_tables_with_finite_distances(tmp_path):
    md = run_script("digits_table1", tmp_path, "--threads", "1")
    assert md == tmp_path / "digits_table1.md"
    check_report(md, ["digits_table1.png", "digits_table1_samples.png"], tables=2 * 2 * 6 + 5)
    text = md.read_text()
    assert "## `uniform` τ" in text and "## `quad` τ" in text and "floor: two real sets" in text
    assert "13.36" in text and "367.43" in text  # the paper's CIFAR-10 table beside ours


def test_reconstruction_smoke_writes_table2_and_the_two_figures(tmp_path):
    md = run_script("digits_reconstruction", tmp_path)
    check_report(md, ["digits_reconstruction.png", "digits_consistency.png", "digits_interpolation.png"], tables=2)
    assert "encode failed" not in md.read_text()


def test_solvers_smoke_writes_rmse_and_data_distance_tables(tmp_path):
    pytest.importorskip("diffusers", reason="the solver benchmark compares with diffusers (the compare extra)")
    pytest.importorskip("torchdiffeq")
    md = run_script("digits_solvers", tmp_path)
    check_report(md, ["digits_solvers.png"], tables=2 * 16)
    assert "DPM-Solver++(2M), diffusers stock" in md.read_text()

