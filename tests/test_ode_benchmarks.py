"""The grid calibration behind ``"calibrated"``: its choice rule, and a smoke run of the script."""
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def calibrate():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import calibrate_grid

        yield calibrate_grid
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_choose_takes_the_least_geometric_mean_of_ratios_to_each_problem_best(calibrate):
    """Blend a is best on one problem and 4× off on the other; b is 1.5× off on both: the geometric means are
    2 and 1.5, so b is chosen, although a has the smaller mean error."""
    errs = {(1, "p", 10, "m"): {"a": 1.0, "b": 1.5}, (1, "q", 10, "m"): {"a": 4.0, "b": 1.5, "c": 1.0},
            (1, "p", 5, "m"): {"a": 9.0, "b": 1.0}}
    errs[(1, "p", 10, "m")]["c"] = 100.0
    ranked = calibrate.choose(errs, 10)
    assert [blend for _, _, blend in ranked] == ["b", "a", "c"]
    assert ranked[0][:2] == (pytest.approx(1.5), pytest.approx(1.5)) and ranked[1][:2] == (pytest.approx(2.0), pytest.approx(4.0))


def test_calibration_smoke_run(calibrate, tmp_path):
    threads = torch.get_num_threads()
    try:
        chosen = calibrate.main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert [nfe for nfe, _, _ in chosen] == [5, 10, 20]
    assert all(w in calibrate.WEIGHTS and t_min in calibrate.T_MINS for _, w, t_min in chosen)
    text = (tmp_path / "calibrated_grid.md").read_text()
    assert "SMOKE RUN" in text and f"Chosen (S = NFE, w, t_min): {tuple(chosen)}" in text
