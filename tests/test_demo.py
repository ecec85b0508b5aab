"""The README's main job in its fast mode: it trains, samples the S × η grid and writes its outputs."""
import csv
import math

from ddim_edu import demo


def test_demo_fast_writes_figures_and_table(tmp_path, capsys):
    out = demo.main(["--fast", "--out", str(tmp_path), "--dataset", "eight_gaussians", "--n-samples", "500"])
    for name in ("samples.png", "table1_toy.png", "table1_toy.md", "table1_toy.csv"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "table1_toy.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["metric", "row", "S=10", "S=20"]
    labels = ["η = 0", "η = 0.2", "η = 0.5", "η = 1", "σ̂", "data floor"]
    assert [r[1] for r in rows[1:]] == labels * 2
    assert {r[0] for r in rows[1:]} == {"MMD²", "energy distance"}
    assert all(math.isfinite(float(v)) for r in rows[1:] for v in r[2:])
    printed = capsys.readouterr().out
    assert "η = 0" in printed and ("As in the paper" in printed or "Unlike the paper" in printed)
