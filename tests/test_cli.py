"""The command line (``python -m ddim_edu sample|fid``): FID glue against closed forms, and sampling end to end
on a tiny random UNet (outputs, determinism across batch sizes, resume, refusals); the Table 1 benchmark's smoke run."""
import dataclasses
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ddim_edu import cli
from ddim_edu.image import generate
from ddim_edu.image.training import load_checkpoint_unet
from ddim_edu.image.data import float_to_pixels
from ddim_edu.schedules import linear_schedule
from ddim_edu.solvers import ADAPTIVE, METHODS, SAMPLERS, sample
from ddim_edu.image.unet import UNet

ROOT = Path(__file__).resolve().parent.parent

# --- sample ----------------------------------------------------------------------------------------


def run_sample(model_dir, out, *extra, batch=2, n=6, steps=5, seed=0):
    args = ["sample", "--model", str(model_dir), "--steps", str(steps), "--num-images", str(n), "--batch-size", str(batch),
            "--seed", str(seed), "--device", "cpu", "--grid", "4", "--quiet", "--out", str(out), *extra]
    return cli.main(args)


def images_of(out):
    with np.load(Path(out) / "samples.npz") as npz:
        return npz["images"]


def test_sample_writes_images_and_grid_and_is_batch_size_independent(tiny_unet, tmp_path):
    folder, _ = tiny_unet
    assert run_sample(folder, tmp_path / "b2", batch=2) == 0
    assert run_sample(folder, tmp_path / "b4", batch=4) == 0  # batches of 4 and 2
    images = images_of(tmp_path / "b2")
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, images_of(tmp_path / "b4"))
    import matplotlib.image
    grid = matplotlib.image.imread(tmp_path / "b2" / "grid.png")
    assert grid.shape[:2] == (2 * 10 + 2, 2 * 10 + 2)  # 4 images of 8×8 in a 2×2 grid with 2-pixel borders
    assert sorted(p.name for p in (tmp_path / "b2" / "shards").iterdir()) == [f"batch_0000{k}.npz" for k in range(3)]
    manifest = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert manifest["method"] == "ddim" and manifest["timesteps"] == [0.0, 200.0, 400.0, 600.0, 800.0]
    # x_T of image i depends on (seed, i) only; another seed gives other images
    np.testing.assert_array_equal(torch.cat([generate.initial_noise(0, 0, 2, (3, 8, 8)), generate.initial_noise(0, 2, 6, (3, 8, 8))]),
                                  generate.initial_noise(0, 0, 6, (3, 8, 8)))
    assert run_sample(folder, tmp_path / "seed1", seed=1) == 0
    assert not np.array_equal(images_of(tmp_path / "seed1"), images)


def test_sample_resumes_from_shards(tiny_unet, tmp_path):
    folder, _ = tiny_unet
    out = tmp_path / "run"
    assert run_sample(folder, out) == 0
    reference = images_of(out)
    shards = sorted((out / "shards").iterdir())
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    shards[1].unlink()
    assert run_sample(folder, out) == 0
    np.testing.assert_array_equal(images_of(out), reference)
    for p in (shards[0], shards[2]):  # untouched
        assert (p.stat().st_mtime_ns, p.read_bytes()) == before[p.name]
    with np.load(shards[1]) as npz:
        np.testing.assert_array_equal(npz["images"], reference[2:4])


def test_sample_interrupted_loses_only_the_batch_in_progress(tiny_unet, tmp_path, monkeypatch, capsys):
    folder, _ = tiny_unet
    assert run_sample(folder, tmp_path / "whole") == 0
    real, calls = generate.sample_batch, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "sample_batch", interrupt_second)
    out = tmp_path / "interrupted"
    assert run_sample(folder, out) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert [p.name for p in (out / "shards").iterdir()] == ["batch_00000.npz"]  # no temporary files left
    assert not (out / "samples.npz").exists()
    monkeypatch.setattr(generate, "sample_batch", real)
    assert run_sample(folder, out) == 0
    np.testing.assert_array_equal(images_of(out), images_of(tmp_path / "whole"))


def test_sample_refuses_other_arguments_in_the_same_folder(tiny_unet, tmp_path, capsys):
    folder, _ = tiny_unet
    out = tmp_path / "run"
    assert run_sample(folder, out, "--method", "sigma_hat") == 0
    assert run_sample(folder, out, "--method", "sigma_hat", seed=1) == 1
    err = capsys.readouterr().err
    assert "seed: stored 0, given 1" in err and "another --out" in err
    assert run_sample(folder, out, "--method", "sigma_hat", batch=3) == 1
    assert "batch_size: stored 2, given 3" in capsys.readouterr().err
    # a stochastic method is reproducible for a seed (and a batch size)
    assert run_sample(folder, tmp_path / "again", "--method", "sigma_hat") == 0
    np.testing.assert_array_equal(images_of(out), images_of(tmp_path / "again"))


def test_sample_unknown_method_lists_the_valid_ones(tiny_unet, tmp_path, capsys):
    folder, _ = tiny_unet
    with pytest.raises(SystemExit) as exit_info:
        run_sample(folder, tmp_path / "x", "--method", "dpm++")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method 'dpm++'" in err
    assert all(name in err for name in [*SAMPLERS, *METHODS, *ADAPTIVE])
    with pytest.raises(SystemExit):
        run_sample(folder, tmp_path / "x", "--method", "heun", "--eta", "0.5")
    assert "eta applies to the methods ddim; method 'heun' does not take it" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sample_from_a_trainer_checkpoint_uses_the_ema_weights(tiny_unet, tiny_unet_config, tmp_path, capsys):
    """--checkpoint reads the "ema" state dict (weights_only), or "model" with --weights model; the same weights
    give the same images as a folder or file holding them."""
    folder, model = tiny_unet
    noise = UNet(tiny_unet_config).state_dict()  # other weights as the "model" entry: only the EMA must be used
    torch.save({"format": "ddim_edu.image_training/1", "step": 1, "model": noise, "ema": model.state_dict(),
                "ema_n_averaged": torch.tensor(1), "optimizer": {}, "scheduler": {}, "rng": {}, "losses": torch.zeros(1),
                "config": {}}, tmp_path / "ck.pt")  # the other entries do not matter for sampling
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(dataclasses.asdict(tiny_unet_config)))
    assert run_sample(folder, tmp_path / "folder", "--method", "dpmpp_2m") == 0
    args = ["sample", "--checkpoint", str(tmp_path / "ck.pt"), "--config", str(config), "--method", "dpmpp_2m", "--steps", "5",
            "--num-images", "6", "--batch-size", "2", "--device", "cpu", "--quiet", "--out", str(tmp_path / "ck")]
    assert cli.main(args) == 0
    np.testing.assert_array_equal(images_of(tmp_path / "ck"), images_of(tmp_path / "folder"))
    # --weights model: the trained weights instead, the same images as a folder holding them
    torch.save(noise, tmp_path / "noise.pt")
    assert cli.main(["sample", "--model", str(tmp_path / "noise.pt"), "--config", str(config), *args[5:-1],
                     str(tmp_path / "noise_folder")]) == 0
    assert cli.main([*args[:-1], str(tmp_path / "ck_model"), "--weights", "model"]) == 0
    np.testing.assert_array_equal(images_of(tmp_path / "ck_model"), images_of(tmp_path / "noise_folder"))
    assert not np.array_equal(images_of(tmp_path / "ck_model"), images_of(tmp_path / "ck"))
    with pytest.raises(SystemExit):
        cli.main(["sample", "--model", str(folder), "--weights", "model", "--out", str(tmp_path / "m")])
    assert "--weights applies to --checkpoint only" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m")]) == 1
    assert cli.main(["sample", "--model", str(tmp_path / "ck.pt"), "--out", str(tmp_path / "m")]) == 1  # the wrong flag
    assert "training checkpoint" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_python_m_ddim_edu_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "ddim_edu", "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "sample" in result.stdout and "fid" in result.stdout


# --- the Table 1 benchmark ----------------------------------------------------------------------------


def load_benchmark():
    spec = importlib.util.spec_from_file_location("cifar10_table1", ROOT / "benchmarks" / "cifar10_table1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table1_smoke_runs_the_whole_grid(tmp_path):
    bench = load_benchmark()
    out = bench.main(["--smoke", "--quiet", "--num-images", "3", "--batch-size", "3", "--work-dir", str(tmp_path / "w"),
                      "--out", str(tmp_path / "table1.md")])
    text = out.read_text()
    assert "| η = 0 | " in text and "| σ̂ | " in text
    assert "(13.36)" in text and "(367.43)" in text  # the paper's numbers beside ours
    assert "3 per cell" in text and "seed 0" in text and "quadratic" in text
    assert len(list((tmp_path / "w").glob("*_S*/fid.json"))) == 25


def test_table1_fails_clearly_without_weights_or_fid_backend(tiny_unet, tmp_path, monkeypatch, capsys, no_torch_fidelity):
    bench = load_benchmark()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", str(tmp_path / "no_such_model"), "--work-dir", str(tmp_path / "w")])
    assert exit_info.value.code == 1
    assert "cannot load the pretrained model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tiny_unet[0]), "--work-dir", str(tmp_path / "w")])
    assert "pip install torch-fidelity" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing sampled


@pytest.mark.parametrize("args,message", [
    (["--num-images", "0"], "--num-images must be at least 2"),
    (["--batch-size", "0"], "--batch-size and --fid-batch-size must be at least 1"),
    (["--etas", "0", "-0.5"], "eta"),
    (["--steps", "10", "1001"], "1001"),
    (["--device", "nonsense"], "device 'nonsense' (--device) cannot be used here"),
])
def test_table1_checks_its_arguments_before_any_work(tmp_path, capsys, args, message):
    """Zero is not read as 'the default', and bad η, S or device stop the run before the model or data are touched."""
    bench = load_benchmark()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", str(tmp_path / "no_such_model"), "--work-dir", str(tmp_path / "w"), *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert message in err and "cannot load the pretrained model" not in err
    assert not (tmp_path / "w").exists()


def test_sample_final_step(tiny_unet, tmp_path, capsys):
    """--final-step extrapolate: recorded in the manifest, equal to sample(..., final_step="extrapolate"),
    other than Euler's last step; refused for an Eq 12 sampler before anything is written."""
    folder, model = tiny_unet
    grid_args = ("--method", "pc_sigma", "--spacing", "linear", "--t-min", "300")  # σ(τ_1) ≈ 1.2: a large last step
    out = tmp_path / "pc"
    assert run_sample(folder, out, *grid_args, "--final-step", "extrapolate", n=2) == 0
    assert json.loads((out / "manifest.json").read_text())["final_step"] == "extrapolate"
    sched = linear_schedule()
    x_T = generate.initial_noise(0, 0, 2, (3, 8, 8))
    expected = sample(model, x_T, sched, sched.timesteps(5, "linear", t_min=300.0), "pc_sigma", final_step="extrapolate")
    np.testing.assert_array_equal(images_of(out), float_to_pixels(expected).permute(0, 2, 3, 1).numpy())
    assert run_sample(folder, tmp_path / "euler", *grid_args, n=2) == 0
    assert not np.array_equal(images_of(out), images_of(tmp_path / "euler"))
    with pytest.raises(SystemExit):
        run_sample(folder, tmp_path / "x", "--method", "ddim", "--final-step", "extrapolate")
    assert "final_step applies to the methods euler, heun" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sample_errors_name_the_subcommand_and_unusable_devices(tiny_unet, tmp_path, capsys):
    folder, _ = tiny_unet
    with pytest.raises(SystemExit):
        run_sample(folder, tmp_path / "x", "--method", "heun", "--eta", "0.5")
    assert "python -m ddim_edu sample: error:" in capsys.readouterr().err  # the subcommand's usage, not the top level's
    for flag, value, message in (("--num-images", "0", "must be at least 1, got 0"), ("--seed", "-1", "must be at least 0, got -1"),
                                 ("--batch-size", "two", "expected an integer, got 'two'")):
        with pytest.raises(SystemExit):
            run_sample(folder, tmp_path / "x", flag, value)
        assert f"argument {flag}: {message}" in capsys.readouterr().err  # named by its flag
    for device in ("foo", "cuda:99" if torch.cuda.is_available() else "cuda"):
        args = ["sample", "--model", str(folder), "--steps", "2", "--num-images", "2", "--device", device, "--quiet",
                "--out", str(tmp_path / device.replace(":", "_"))]
        assert cli.main(args) == 1
        err = capsys.readouterr().err
        assert f"device {device!r} (--device) cannot be used here" in err and "try 'cpu'" in err
        assert not (tmp_path / device.replace(":", "_")).exists()  # refused before the folder is made


def test_sample_failed_before_any_batch_does_not_block_the_corrected_rerun(tiny_unet, tmp_path, capsys, monkeypatch):
    """A run that fails after writing its manifest but before any batch leaves nothing to protect, so the
    corrected command is not refused as 'other arguments'. Arguments that cannot work are refused before
    any file is written."""
    folder, _ = tiny_unet
    out = tmp_path / "run"
    assert run_sample(folder, out, "--method", "euler", "--final-step", "extrapolate", steps=1) == 1
    assert "at least 2 timesteps" in capsys.readouterr().err
    assert not out.exists()

    def fail(*args, **kwargs):
        raise ValueError("the first batch failed")

    monkeypatch.setattr(generate, "sample_batch", fail)
    assert run_sample(folder, out, "--method", "euler", steps=1) == 1
    assert "the first batch failed" in capsys.readouterr().err
    assert (out / "manifest.json").is_file() and not any((out / "shards").glob("*.npz"))
    monkeypatch.undo()
    assert run_sample(folder, out, "--method", "euler", "--final-step", "extrapolate", steps=2) == 0
    assert json.loads((out / "manifest.json").read_text())["steps"] == 2
    assert run_sample(folder, out, "--method", "euler", steps=3) == 1  # with samples made, other arguments are refused
    assert "steps: stored 2, given 3" in capsys.readouterr().err


def test_sample_rerun_after_removing_shards_writes_the_requested_grid(tiny_unet, tmp_path):
    import matplotlib.image

    folder, _ = tiny_unet
    out = tmp_path / "run"
    assert cli.main(["sample", "--model", str(folder), "--steps", "2", "--num-images", "4", "--batch-size", "2",
                     "--grid", "0", "--remove-shards", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    assert not (out / "grid.png").exists()
    assert cli.main(["sample", "--model", str(folder), "--steps", "2", "--num-images", "4", "--batch-size", "2",
                     "--grid", "4", "--remove-shards", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    assert matplotlib.image.imread(out / "grid.png").shape[:2] == (22, 22)  # 4 images of 8×8 in a 2×2 grid


def test_sample_sigterm_is_ctrl_c(tiny_unet, tmp_path, monkeypatch, capsys):
    """SIGTERM (a job scheduler stopping the run) ends like Ctrl-C: exit 130 with the resume hint; the handler is restored."""
    import os
    import signal

    folder, _ = tiny_unet
    real, calls = generate.sample_batch, []

    def terminate_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(generate, "sample_batch", terminate_second)
    assert run_sample(folder, tmp_path / "run") == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    assert [p.name for p in (tmp_path / "run" / "shards").iterdir()] == ["batch_00000.npz"]


def test_sample_adaptive_solver_tolerances(tiny_unet, tmp_path, capsys):
    """--rtol/--atol reach the adaptive solver (the images equal sample(..., rtol, atol)) and are recorded in the
    manifest; they are refused for other methods and must be positive."""
    folder, model = tiny_unet
    out = tmp_path / "dopri"
    assert run_sample(folder, out, "--method", "dopri5", "--rtol", "1e-3", "--atol", "1e-4", n=2) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["rtol"], manifest["atol"]) == (1e-3, 1e-4)
    sched = linear_schedule()
    x_T = generate.initial_noise(0, 0, 2, (3, 8, 8))
    expected = sample(model, x_T, sched, sched.timesteps(5), "dopri5", rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(images_of(out), float_to_pixels(expected).permute(0, 2, 3, 1).numpy())
    assert run_sample(folder, tmp_path / "default", "--method", "dopri5", n=2) == 0  # the solver's defaults, recorded
    assert json.loads((tmp_path / "default" / "manifest.json").read_text())["rtol"] == 1e-5
    for bad, message in ((["--method", "ddim", "--rtol", "1e-3"], "applies to the methods dopri5"),
                         (["--method", "dopri5", "--atol", "0"], "atol must be a finite number > 0")):
        with pytest.raises(SystemExit):
            run_sample(folder, tmp_path / "x", *bad)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert run_sample(folder, tmp_path / "ddim", n=2) == 0
    assert "rtol" not in json.loads((tmp_path / "ddim" / "manifest.json").read_text())  # older folders still resume


def test_sample_runs_small_models_on_one_thread_unless_told(tiny_unet, tmp_path, monkeypatch):
    """On a CPU a small model samples on one intra-op thread (on a busy 2-core machine two threads were ~100×
    slower), unless --threads (or OMP_NUM_THREADS) says otherwise; the thread count is restored afterwards."""
    folder, _ = tiny_unet
    seen = []
    real = generate.sample_batch

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "sample_batch", spy)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    assert run_sample(folder, tmp_path / "a", n=2, batch=2) == 0
    assert run_sample(folder, tmp_path / "b", "--threads", "2", n=2, batch=2) == 0
    assert seen == [1, 2] and torch.get_num_threads() == before
