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


class _Stop(Exception):
    pass


def test_demo_threads(monkeypatch, tmp_path):
    """One thread by default (unless the user chose a number), --threads N if given; the count comes back after."""
    import pytest
    import torch

    from ddim_edu.utils import threads as threads_module

    seen = []

    def record(*args, threads=None, **kwargs):
        seen.append((torch.get_num_threads(), threads))
        raise _Stop

    monkeypatch.setattr(demo, "train_eps_model", record)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads_module, "_THREADS_AT_IMPORT", 2)  # as if torch's default of 2 were in force
    monkeypatch.setattr(threads_module, "_physical_cores", lambda: 2)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for argv, expected in (([], 1), (["--threads", "3"], 3)):
            with pytest.raises(_Stop):
                demo.main(["--fast", "--out", str(tmp_path), *argv])
            assert seen[-1] == (expected, expected) and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice is kept
        with pytest.raises(_Stop):
            demo.main(["--fast", "--out", str(tmp_path)])
        assert seen[-1] == (2, 2)
        with pytest.raises(SystemExit):
            demo.main(["--threads", "0"])
    finally:
        torch.set_num_threads(previous)


def test_animate_trajectories_writes_one_frame_per_state_and_holds_the_last(tmp_path):
    """S + 1 states of each trajectory give S + 1 frames; the last is held ``hold`` frames more (the GIF writer
    merges identical frames, so the last frame lasts 1 + hold times as long as the others)."""
    from PIL import Image

    import torch

    from ddim_edu.mixture import GaussianMixture
    from ddim_edu.schedules import linear_schedule
    from ddim_edu.solvers import sample

    schedule, ring = linear_schedule(), GaussianMixture.ring()
    tau = schedule.timesteps(4, "uniform")
    x_T = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    paths = {f"η = {eta:g}": sample(ring.eps_model(schedule), x_T, schedule, tau, eta=eta, return_trajectory=True,
                                    generator=torch.Generator().manual_seed(1)) for eta in (0.0, 1.0)}
    gif = tmp_path / "paths.gif"
    demo.animate_trajectories(paths, tau, x_T, gif, hold=3, fps=8)
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames == len(tau) + 1
        durations = []
        for k in range(image.n_frames):
            image.seek(k)
            durations.append(image.info["duration"])
    frame_ms = 1000 / 8  # GIF durations are whole centiseconds: within 10 ms
    assert all(abs(d - frame_ms) <= 10 for d in durations[:-1]) and abs(durations[-1] - 4 * frame_ms) <= 10, durations
