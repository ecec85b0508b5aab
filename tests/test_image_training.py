"""Image trainer: exact resume, Ctrl-C safety, atomic checkpoints, DDP equivalence, sample grids."""
import dataclasses
import os
import signal
import socket

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from ddim_edu.image.data import load_offline_images
from ddim_edu.image.training import make_grid, train_image_model
from ddim_edu.schedules import linear_schedule
from ddim_edu.training import CHECKPOINT_FORMAT, TrainConfig, load_checkpoint, save_checkpoint, shard_loss, simple_loss


class TinyEps(nn.Module):
    """A two-layer conv ε-model with a time bias and (optional) dropout: enough to test the trainer."""

    def __init__(self, dropout=0.1, width=8):
        super().__init__()
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.time(t[:, None] / 1000.0)[:, :, None, None]
        return self.out(self.drop(torch.nn.functional.silu(h)))


def tiny_model(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return TinyEps(dropout)


SCHED = linear_schedule()
DATA = load_offline_images(size=8, n=24, seed=3)
# small, fast settings; warm-up and EMA decay short enough that every piece of state matters
FAST = TrainConfig(batch_size=4, lr=1e-2, warmup=3, ema_decay=0.5, grad_clip=0.5)


def fast(steps, **changes):
    return dataclasses.replace(FAST, steps=steps, **changes)


def assert_same_bits(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def reference():
    """6 uninterrupted steps from tiny_model(0): the run every resumed run must reproduce bit for bit.

    tiny_model(0) seeds the global RNG, so dropout draws the same masks in every run that starts there.
    """
    return train_image_model(tiny_model(0), DATA, SCHED, fast(6), progress=False)


def test_shard_loss_is_simple_loss_on_the_whole_batch():
    model, x0 = tiny_model(0, dropout=0.0), DATA[:5]
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(shard_loss(model, x0, SCHED, g1, 5, 0), simple_loss(model, x0, SCHED, g2))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_resume_is_bitwise_exact(reference, tmp_path):
    ckpt = tmp_path / "run.pt"
    first = train_image_model(tiny_model(0), DATA, SCHED, fast(3), checkpoint=ckpt, checkpoint_every=100, progress=False)
    assert first.step == 3 and load_checkpoint(ckpt)["step"] == 3
    torch.manual_seed(999)  # scramble the global RNG: the checkpoint must restore it
    resumed = train_image_model(tiny_model(5), DATA, SCHED, fast(6), checkpoint=ckpt, progress=False)
    assert resumed.step == 6
    assert_same_bits(resumed.model, reference.model)
    assert_same_bits(resumed.ema, reference.ema)
    assert torch.equal(resumed.losses, reference.losses)
    # the checkpoint is plain tensors and containers
    state = torch.load(ckpt, weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["step"] == 6 and len(state["losses"]) == 6
    # a finished run resumed to the same length does nothing
    again = train_image_model(tiny_model(5), DATA, SCHED, fast(6), checkpoint=ckpt, progress=False)
    assert again.step == 6 and torch.equal(again.losses, reference.losses)
    assert_same_bits(again.ema, reference.ema)


def test_compiled_forward_resumes_into_the_same_run(reference, tmp_path):
    """torch.compile (the cheap "eager" backend, to test the wiring) changes neither the run nor the checkpoint keys."""
    ckpt = tmp_path / "run.pt"
    train_image_model(tiny_model(0), DATA, SCHED, fast(3), checkpoint=ckpt, compile={"backend": "eager"}, progress=False)
    assert not any("_orig_mod" in k for k in load_checkpoint(ckpt)["model"])
    resumed = train_image_model(tiny_model(5), DATA, SCHED, fast(6), checkpoint=ckpt, progress=False)
    torch.testing.assert_close(resumed.model.state_dict(), reference.model.state_dict(), rtol=1e-6, atol=1e-7)


def test_ctrl_c_between_steps_saves_and_resumes(reference, tmp_path):
    ckpt = tmp_path / "run.pt"

    def interrupt(step, loss, model, ema):
        if step == 3:  # after the 4th step; the last periodic checkpoint was at step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_image_model(tiny_model(0), DATA, SCHED, fast(6), checkpoint=ckpt, checkpoint_every=2, callback=interrupt,
                          progress=False)
    assert load_checkpoint(ckpt)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temporary files left
    resumed = train_image_model(tiny_model(5), DATA, SCHED, fast(6), checkpoint=ckpt, progress=False)
    assert_same_bits(resumed.model, reference.model)
    assert_same_bits(resumed.ema, reference.ema)


def test_sigterm_is_ctrl_c(reference, tmp_path):
    """SIGTERM between steps saves the last finished step like Ctrl-C; the previous handler comes back."""
    import os
    import signal

    ckpt = tmp_path / "run.pt"
    before = signal.getsignal(signal.SIGTERM)

    def terminate(step, loss, model, ema):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train_image_model(tiny_model(0), DATA, SCHED, fast(6), checkpoint=ckpt, checkpoint_every=2, callback=terminate,
                          progress=False)
    assert signal.getsignal(signal.SIGTERM) is before
    assert load_checkpoint(ckpt)["step"] == 4
    resumed = train_image_model(tiny_model(5), DATA, SCHED, fast(6), checkpoint=ckpt, progress=False)
    assert_same_bits(resumed.model, reference.model)


def test_ctrl_c_inside_a_step_saves_the_last_finished_step(reference, tmp_path):
    ckpt = tmp_path / "run.pt"
    model = tiny_model(0)
    calls = {"n": 0}
    forward = model.forward

    def forward_then_interrupt(x, t):
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of the 4th step: it is dropped, the 3rd is saved
            raise KeyboardInterrupt
        return forward(x, t)

    model.forward = forward_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        train_image_model(model, DATA, SCHED, fast(6), checkpoint=ckpt, checkpoint_every=2, progress=False)
    assert load_checkpoint(ckpt)["step"] == 3
    resumed = train_image_model(tiny_model(5), DATA, SCHED, fast(6), checkpoint=ckpt, progress=False)
    assert_same_bits(resumed.model, reference.model)


class Interrupt:
    """Interrupts the 4th training step (step 3, 0-based) at one point: ``raise`` a KeyboardInterrupt there, or
    send this process SIGINT or SIGTERM (whose handler raises it wherever Python is when it runs)."""

    def __init__(self, how):
        self.how, self.calls = how, 0

    def tick(self):
        """Count a call (one per step) and interrupt at the 4th."""
        self.calls += 1
        self(self.calls - 1)

    def __call__(self, step_index):
        if step_index != 3:
            return
        if self.how == "raise":
            raise KeyboardInterrupt
        os.kill(os.getpid(), {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[self.how])


def _patch_counting(monkeypatch, owner, name, interrupt, before: bool):
    """Wrap ``owner.name`` (a method) so that its 4th call interrupts, before or after running the original."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        calls["n"] += 1
        if before:
            interrupt(calls["n"] - 1)
        out = original(self, *args, **kwargs)
        if not before:
            interrupt(calls["n"] - 1)
        return out

    monkeypatch.setattr(owner, name, patched)


# (where, how) -> the step the checkpoint must hold: 3 if the 4th step is dropped, 4 if it is finished
INTERRUPTIONS = {
    ("forward", "raise"): 3,
    ("forward", "sigint"): 3,
    ("forward", "sigterm"): 3,
    ("backward", "raise"): 3,
    ("backward", "sigterm"): 3,
    ("before optimizer.step", "raise"): 3,
    ("before optimizer.step", "sigterm"): 4,  # held until the step has finished
    ("after optimizer.step", "raise"): 4,  # the optimiser has updated: the step is finished before saving
    ("after optimizer.step", "sigint"): 4,
    ("after optimizer.step", "sigterm"): 4,
    ("before the EMA update", "raise"): 4,
    ("before the EMA update", "sigterm"): 4,
    ("after the EMA update", "raise"): 4,
    ("after the EMA update", "sigterm"): 4,
    ("callback", "raise"): 4,
    ("callback", "sigint"): 4,
}


@pytest.fixture
def sigint_as_at_a_terminal():
    """SIGINT with Python's own handler, as a run started at a terminal has it (a job a non-interactive shell
    starts in the background inherits an ignored SIGINT, which the trainer rightly leaves alone)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("where, how", list(INTERRUPTIONS))
def test_interrupt_anywhere_in_a_step_saves_the_last_finished_step(reference, tmp_path, monkeypatch, where, how,
                                                                   sigint_as_at_a_terminal):
    """Wherever Ctrl-C or SIGTERM lands in a step, the checkpoint is that of the last finished step (periodic ones
    at step 2 only), and resuming from it reproduces the uninterrupted run bit for bit."""
    from torch.optim.swa_utils import AveragedModel

    ckpt = tmp_path / "run.pt"
    interrupt = Interrupt(how)
    model = tiny_model(0)
    callback = None
    if where == "forward":
        forward = model.forward

        def interrupted_forward(x, t):
            interrupt.tick()
            return forward(x, t)

        model.forward = interrupted_forward
    elif where == "backward":
        model.out.weight.register_hook(lambda grad: interrupt.tick())
    elif where.endswith("optimizer.step"):
        _patch_counting(monkeypatch, torch.optim.AdamW, "step", interrupt, before=where.startswith("before"))
    elif where.endswith("EMA update"):
        _patch_counting(monkeypatch, AveragedModel, "update_parameters", interrupt, before=where.startswith("before"))
    else:
        callback = lambda step, loss, model, ema: interrupt(step)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        train_image_model(model, DATA, SCHED, fast(6), checkpoint=ckpt, checkpoint_every=2, callback=callback,
                          progress=False)
    monkeypatch.undo()
    saved = load_checkpoint(ckpt)
    assert saved["step"] == INTERRUPTIONS[where, how]
    assert len(saved["losses"]) == saved["step"] and int(saved["ema_n_averaged"]) == saved["step"]
    assert saved["scheduler"]["last_epoch"] == saved["step"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temporary files left
    resumed = train_image_model(tiny_model(5), DATA, SCHED, fast(6), checkpoint=ckpt, progress=False)
    assert_same_bits(resumed.model, reference.model)
    assert_same_bits(resumed.ema, reference.ema)
    assert torch.equal(resumed.losses, reference.losses)


def test_second_signal_does_not_cut_the_save_short(tmp_path, monkeypatch):
    """A SIGTERM that arrives while the checkpoint of an interrupted run is being written waits for the write."""
    from ddim_edu import training

    ckpt = tmp_path / "run.pt"
    real_save = training.save_checkpoint
    interrupted = []

    def save_with_a_signal(path, checkpoint):
        if interrupted:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(path, checkpoint)

    def interrupt(step, loss, model, ema):
        if step == 2:
            interrupted.append(step)
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_with_a_signal)
    with pytest.raises(KeyboardInterrupt):
        train_image_model(tiny_model(0), DATA, SCHED, fast(6), checkpoint=ckpt, checkpoint_every=100, callback=interrupt,
                          progress=False)
    assert load_checkpoint(ckpt)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_interrupt_handlers_come_back(tmp_path):
    """SIGINT's and SIGTERM's handlers are the caller's again after training, and a SIGINT handler of the
    caller's own is left alone during training."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        train_image_model(tiny_model(0), DATA, SCHED, fast(2), checkpoint=tmp_path / "run.pt", progress=False,
                          callback=lambda step, loss, model, ema: os.kill(os.getpid(), signal.SIGINT))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.SIGINT, signal.SIGINT]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"x": torch.arange(3)})
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"x": torch.arange(5)})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_corrupt_checkpoint_gives_clear_errors(tmp_path):
    ckpt = tmp_path / "run.pt"
    train_image_model(tiny_model(0), DATA, SCHED, fast(1), checkpoint=ckpt, progress=False)
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="truncated or corrupt"):  # the trainer does not start from it
        train_image_model(tiny_model(0), DATA, SCHED, fast(2), checkpoint=ckpt, progress=False)
    ckpt.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(ckpt)
    torch.save({"weights": torch.zeros(2)}, ckpt)
    with pytest.raises(ValueError, match="not a ddim_edu.image.training"):
        load_checkpoint(ckpt)
    torch.save({"obj": nn.Linear(1, 1)}, ckpt)  # a pickled module: refused by weights_only
    with pytest.raises(ValueError, match=r"pickles torch\.nn\.modules\.linear\.Linear, not only tensors"):
        load_checkpoint(ckpt)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    ckpt.write_bytes(good)
    with pytest.raises(ValueError, match=r"another architecture .*size mismatch for inp\.weight"):
        train_image_model(TinyEps(width=4), DATA, SCHED, fast(2), checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train_image_model(tiny_model(0), DATA, SCHED, fast(2, batch_size=8), checkpoint=ckpt, progress=False)
    train_image_model(tiny_model(0), DATA, SCHED, fast(3), checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match=r"at step 3, past steps=2 \(steps counts from the start"):
        train_image_model(tiny_model(0), DATA, SCHED, fast(2), checkpoint=ckpt, progress=False)
    assert load_checkpoint(ckpt)["step"] == 3  # untouched
    with pytest.raises(ValueError, match="is a folder"):
        train_image_model(tiny_model(0), DATA, SCHED, fast(2), checkpoint=tmp_path, progress=False)


def test_unet_checkpoint_stores_its_config_and_data_must_fit(tmp_path):
    """A UNet's config travels with the checkpoint (the CLI samples from it without --config); data of another
    image size than the UNet's is refused before training."""
    from ddim_edu import cli
    from ddim_edu.image.unet import UNet, UNetConfig

    config = UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                        norm_groups=8, dropout=0.0)
    torch.manual_seed(0)
    result = train_image_model(UNet(config), DATA, SCHED, fast(2), checkpoint=tmp_path / "u.pt", progress=False)
    assert UNetConfig(**load_checkpoint(tmp_path / "u.pt")["unet_config"]) == config
    ema = cli.load_checkpoint_unet(tmp_path / "u.pt")  # no config given
    assert ema.config == config and all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), result.ema.state_dict().values()))
    with pytest.raises(ValueError, match=r"data are images \(3, 8, 8\) but the UNet takes \(3, 16, 16\)"):
        train_image_model(UNet(UNetConfig(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                          attention_resolutions=(8,), norm_groups=8)), DATA, SCHED, fast(1), progress=False)


def test_float_images_must_lie_in_minus_one_one(tmp_path):
    """Float pixels 0–255 are refused before training; a resume with images on another scale is refused too."""
    pixels = (DATA + 1) * 127.5
    with pytest.raises(ValueError, match=r"images must be uint8 pixels or floats in \[-1, 1\]; these float images lie in "
                                         r"\[\d.*pixels 0–255 as floats\? Pass them as uint8"):
        train_image_model(tiny_model(0), pixels, SCHED, fast(1), progress=False)
    nan_image = DATA.clone()
    nan_image[5, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf values in 1 of 24 examples, the first at index 5"):
        train_image_model(tiny_model(0), nan_image, SCHED, fast(1), progress=False)
    ckpt = tmp_path / "run.pt"
    train_image_model(tiny_model(0), DATA, SCHED, fast(1), checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match=r"data range \(as the network sees it\): stored \[-0.99\d*, 1\] \(float32\), "
                                         r"given \[0.00\d*, 1\]"):
        train_image_model(tiny_model(0), (DATA + 1) / 2, SCHED, fast(2), checkpoint=ckpt, progress=False)
    # the same images as uint8 pixels are the same data to the network
    assert train_image_model(tiny_model(0), pixels.round().to(torch.uint8), SCHED, fast(2), checkpoint=ckpt,
                             progress=False).step == 2


def test_sample_grids_are_written(tmp_path):
    out = tmp_path / "samples"
    uint8_data = ((DATA + 1) * 127.5).round().to(torch.uint8)  # pixels are accepted as well
    train_image_model(tiny_model(0), uint8_data, SCHED, fast(3), sample_dir=out, sample_every=2, n_samples=5,
                      sample_steps=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["samples_0000002.png", "samples_0000003.png"]
    img = matplotlib.image.imread(out / "samples_0000003.png")
    assert img.shape[:2] == (3 * 2 + 2 * 8, 4 * 2 + 3 * 8)  # 5 images of 8×8 in 2 rows of 3, padding 2


def test_make_grid_tiles_images():
    images = torch.stack([torch.full((3, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    grid = make_grid(images, nrow=2, padding=1, pad_value=7)
    assert grid.shape == (7, 7, 3) and grid.dtype == np.uint8
    assert (grid[1:3, 1:3] == 0).all() and (grid[1:3, 4:6] == 128).all() and (grid[4:6, 1:3] == 255).all()
    assert (grid[0] == 7).all() and (grid[4:6, 4:6] == 7).all()  # padding and the empty cell


def test_invalid_arguments():
    with pytest.raises(ValueError, match="data must be images"):
        train_image_model(tiny_model(0), DATA[:, 0], SCHED, fast(1), progress=False)
    with pytest.raises(ValueError, match="steps must be an int"):
        train_image_model(tiny_model(0), DATA, SCHED, fast(0), progress=False)
    with pytest.raises(ValueError, match="grad_clip"):
        train_image_model(tiny_model(0), DATA, SCHED, fast(1, grad_clip=-1.0), progress=False)


# --- DDP: 2 processes with gloo on the CPU -------------------------------------------------------------

DDP_STEPS = 4
DDP_BATCH = 6


def _ddp_worker(rank, world, port, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # the weights differ on each rank: DDP must broadcast rank 0's
        ckpt = os.path.join(folder, "ddp.pt")
        train_image_model(tiny_model(rank, dropout=0.0), DATA, SCHED, fast(DDP_STEPS // 2, batch_size=DDP_BATCH),
                          checkpoint=ckpt, progress=False)
        # then resume (from new weights) to the end
        result = train_image_model(tiny_model(rank + 10, dropout=0.0), DATA, SCHED, fast(DDP_STEPS, batch_size=DDP_BATCH),
                                   checkpoint=ckpt, sample_dir=os.path.join(folder, f"samples{rank}"), sample_every=100,
                                   n_samples=2, sample_steps=2, progress=False)
        torch.save({"model": result.model.state_dict(), "ema": result.ema.state_dict(), "losses": result.losses},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    """Two gloo processes, with a checkpoint and resume half-way, against one process on the global batch."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("model", "ema"):  # the replicas stay identical
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    # only rank 0 wrote files
    assert (tmp_path / "samples0").is_dir() and not (tmp_path / "samples1").exists()
    assert load_checkpoint(tmp_path / "ddp.pt")["step"] == DDP_STEPS

    single = train_image_model(tiny_model(0, dropout=0.0), DATA, SCHED, fast(DDP_STEPS, batch_size=DDP_BATCH),
                               progress=False)
    for part, module in (("model", single.model), ("ema", single.ema)):
        for k, v in module.state_dict().items():
            torch.testing.assert_close(r0[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")
    torch.testing.assert_close(r0["losses"], single.losses, rtol=1e-5, atol=1e-6)


def _ddp_dropout_worker(rank, world, port, folder):
    """With dropout: record each step's mask on this rank; 4 steps straight, and 2 + resume 2 into another checkpoint."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        masks = []
        model = tiny_model(rank, dropout=0.5)
        model.drop.register_forward_hook(lambda module, inputs, output: masks.append(output == 0))
        straight = train_image_model(model, DATA, SCHED, fast(DDP_STEPS, batch_size=DDP_BATCH),
                                     checkpoint=os.path.join(folder, "a.pt"), progress=False)
        ckpt = os.path.join(folder, "b.pt")
        train_image_model(tiny_model(rank, dropout=0.5), DATA, SCHED, fast(DDP_STEPS // 2, batch_size=DDP_BATCH),
                          checkpoint=ckpt, progress=False)
        resumed = train_image_model(tiny_model(rank + 10, dropout=0.5), DATA, SCHED, fast(DDP_STEPS, batch_size=DDP_BATCH),
                                    checkpoint=ckpt, progress=False)
        torch.save({"masks": torch.stack(masks), "straight": straight.model.state_dict(),
                    "resumed": resumed.model.state_dict()}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_dropout_masks_differ_across_ranks_and_resume_exactly(tmp_path):
    """Each rank draws its own dropout masks (seeded from seed, rank and step), and resuming half-way is still exact."""
    mp.spawn(_ddp_dropout_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["masks"].shape[0] == DDP_STEPS
    for step in range(DDP_STEPS):
        assert not torch.equal(r0["masks"][step], r1["masks"][step]), step
        assert 0.3 < r0["masks"][step].float().mean() < 0.7  # dropout 0.5 is in force
    for k in r0["straight"]:
        assert torch.equal(r0["straight"][k], r1["straight"][k]), k  # replicas identical
        assert torch.equal(r0["resumed"][k], r0["straight"][k]), k  # 2 + 2 steps = 4 steps, bit for bit


def test_show_rows_puts_each_batch_in_a_labelled_row():
    """Two batches of three grey 8×8 images: a 2×3 tiling with one pixel of padding, ticks at the row and column
    centres with the given labels, drawn in grey; RGB batches keep their colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddim_edu.image.grids import show_rows

    rows = [torch.full((3, 1, 8, 8), -1.0), torch.ones(3, 1, 8, 8)]
    fig, ax = plt.subplots()
    show_rows(ax, rows, ["dark", "light"], title="t", xlabel="x", column_labels=["a", "b", "c"])
    image = ax.get_images()[0]
    assert image.get_array().shape == (2 * 9 + 1, 3 * 9 + 1) and image.get_cmap().name == "gray"
    assert list(ax.get_yticks()) == [4.5, 13.5] and [t.get_text() for t in ax.get_yticklabels()] == ["dark", "light"]
    assert list(ax.get_xticks()) == [4.5, 13.5, 22.5] and [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert image.get_array()[5, 5] == 0 and image.get_array()[14, 5] == 255  # the rows in their order
    ax.clear()
    show_rows(ax, [torch.zeros(2, 3, 8, 8)], ["rgb"])
    assert ax.get_images()[0].get_array().shape == (10, 19, 3) and list(ax.get_xticks()) == []
    plt.close(fig)
