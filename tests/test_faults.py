"""Faults injected into ``python -m ddim_edu sample`` and the readers of downloaded files: two runs into one folder,
SIGINT/SIGTERM/SIGKILL at random points and the bit-exact resume, a full disk, folders that are not the command's,
changed shards, absurd sizes, and hostile pickles and archives. Each test takes seconds on a CPU."""
import errno
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddim_edu import cli
from ddim_edu.image import data, generate, pretrained
from ddim_edu.image.data import extract_cifar10, load_cifar10
from ddim_edu.image.pretrained import CONFIG_NAME, CheckpointError, diffusers_config, load_unet
from ddim_edu.image.unet import UNet
from ddim_edu.utils import files
from ddim_edu.utils.files import folder_lock, load_weights_only

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as in this process (conftest)
RUN = dict(n=16, batch=2, steps=30)  # 8 batches of about 0.15 s each: room for a signal between them


@pytest.fixture(scope="module")
def tiny_model(tiny_unet):
    """The folder of conftest's tiny random UNet (diffusers layout)."""
    return tiny_unet[0]


def sample_args(model_dir, out, *extra, n=6, batch=2, steps=5, seed=0):
    return ["sample", "--model", str(model_dir), "--steps", str(steps), "--num-images", str(n), "--batch-size", str(batch),
            "--seed", str(seed), "--device", "cpu", "--grid", "4", "--quiet", "--out", str(out), *extra]


def run_sample(model_dir, out, *extra, **kwargs):
    return cli.main(sample_args(model_dir, out, *extra, **kwargs))


def start_sample(model_dir, out, *extra, **kwargs):
    """``python -m ddim_edu sample`` in a child process whose SIGINT is Python's Ctrl-C (even if ours is ignored)."""
    return subprocess.Popen([sys.executable, "-m", "ddim_edu", *sample_args(model_dir, out, *extra, **kwargs)],
                            env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the child process never got there")
        time.sleep(0.01)


def arrays_of(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def shard_count(out):
    return len(list((Path(out) / "shards").glob("batch_*.npz")))


def images_of(out):
    with np.load(Path(out) / "samples.npz") as npz:
        return npz["images"]


def listing(out):
    return sorted(str(p.relative_to(out)) for p in Path(out).rglob("*"))


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """An uninterrupted run of RUN's arguments: (its folder, its images)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_sample(tiny_model, out, **RUN) == 0
    return out, images_of(out)


# --- 1. one writer per folder ----------------------------------------------------------------------------------


def test_a_folder_in_use_is_refused_at_once_whatever_the_arguments(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with folder_lock(out):  # as another run would hold it
        for seed in (0, 1):
            start = time.monotonic()
            assert run_sample(tiny_model, out, seed=seed) == 1
            assert time.monotonic() - start < 30
            err = capsys.readouterr().err
            assert f"{out} is in use: process {os.getpid()} is writing into it" in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written by the refused runs
    assert not (out / ".lock").exists()  # removed when released
    assert run_sample(tiny_model, out) == 0
    assert not (out / ".lock").exists()


def test_two_concurrent_runs_the_second_refused_the_first_complete(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    first = start_sample(tiny_model, out, n=12, batch=1, steps=40)
    try:
        wait_for(lambda: (out / "manifest.json").exists() or first.poll() is not None)
        assert first.poll() is None, first.communicate()
        start = time.monotonic()
        assert run_sample(tiny_model, out, seed=1, n=12, batch=1, steps=40) == 1  # other arguments: refused all the same
        assert time.monotonic() - start < 30
        assert "is in use: process" in capsys.readouterr().err
        assert first.poll() is None  # the second was refused while the first ran
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert f"wrote {out / 'samples.npz'}" in stdout
    assert json.loads((out / "manifest.json").read_text())["seed"] == 0
    assert run_sample(tiny_model, tmp_path / "alone", n=12, batch=1, steps=40) == 0
    np.testing.assert_array_equal(images_of(out), images_of(tmp_path / "alone"))
    assert listing(out) == listing(tmp_path / "alone")  # no lock file or temporary left


# --- signals at random points, then a bit-exact resume -------------------------------------------------------


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 130), (signal.SIGKILL, -signal.SIGKILL)])
def test_killed_at_random_points_then_resumed_bit_exactly(tiny_model, reference, tmp_path, signum, status):
    ref_out, ref_images = reference
    out = tmp_path / "run"
    rng = random.Random(f"{signum}")
    interrupted = 0
    for _ in range(2):
        before = shard_count(out)
        child = start_sample(tiny_model, out, **RUN)
        wait_for(lambda: shard_count(out) > before or child.poll() is not None)
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=120)
        if child.returncode == 0:  # it finished before the signal
            break
        assert child.returncode == status, stderr
        interrupted += 1
        if signum != signal.SIGKILL:
            assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert interrupted >= 1
    assert run_sample(tiny_model, out, **RUN) == 0  # the rerun resumes
    np.testing.assert_array_equal(images_of(out), ref_images)
    assert listing(out) == listing(ref_out)  # a stale lock or temporary file is gone too


def test_stale_lock_and_temporaries_of_a_killed_run_are_cleared(tiny_model, tmp_path):
    out = tmp_path / "run"
    assert run_sample(tiny_model, out) == 0
    want = images_of(out)
    (out / "shards" / "batch_00001.npz").unlink()
    (out / "samples.npz").unlink()
    (out / ".lock").write_text("12345\n")  # left by a SIGKILLed run: no process holds its flock
    (out / "shards" / ".batch_00001.npz.k3j_9xqz.tmp").write_bytes(b"PK\x03\x04 half a shard")
    (out / ".samples.npz.a1b2c3d4.tmp").write_bytes(b"")
    assert run_sample(tiny_model, out) == 0
    np.testing.assert_array_equal(images_of(out), want)
    assert listing(out) == ["grid.png", "manifest.json", "samples.npz", "shards", "shards/batch_00000.npz",
                            "shards/batch_00001.npz", "shards/batch_00002.npz"]


# --- a full disk, a read-only folder, bad --out -----------------------------------------------------------------


class FullDisk:
    """``os`` for ddim_edu.utils.files, where the ``full_at``-th file written (0: the first) meets a full disk: it
    takes ``room`` bytes, then the write raises ENOSPC (a torn temporary file), as a real full disk does."""

    def __init__(self, full_at, room=100):
        self.full_at, self.room, self.opened = full_at, room, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, mode="r", *args, **kwargs):
        disk, real = self, os.fdopen(fd, mode, *args, **kwargs)
        self.opened += 1
        if self.opened - 1 != self.full_at:
            return real

        class Limited(io.RawIOBase):
            def write(self, b):
                n = min(len(b), disk.room)
                real.write(bytes(b[:n]))
                disk.room -= n
                if n < len(b):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return n

            def seek(self, *a):
                return real.seek(*a)

            def tell(self):
                return real.tell()

            def seekable(self):
                return True

            def writable(self):
                return True

            def flush(self):
                real.flush()

            def fileno(self):
                return real.fileno()

            def close(self):
                if not self.closed:
                    super().close()
                    real.close()

        return Limited()


def no_torn_files(out):
    """No temporary file anywhere, and every .npz and .json reads back whole."""
    for path in Path(out).rglob("*"):
        assert not path.name.endswith(".tmp"), path
        if path.suffix == ".npz":
            with np.load(path) as npz:
                [npz[k] for k in npz.files]
        elif path.suffix == ".json":
            json.loads(path.read_text())


@pytest.mark.parametrize("fails", ["manifest.json", "batch_00000.npz", "batch_00002.npz", "samples.npz", "grid.png"])
def test_a_full_disk_is_one_line_and_leaves_no_torn_file(tiny_model, tmp_path, monkeypatch, capsys, fails):
    assert run_sample(tiny_model, tmp_path / "whole") == 0
    out = tmp_path / "run"
    order = ["manifest.json", "batch_00000.npz", "batch_00001.npz", "batch_00002.npz", "samples.npz",  # as written
             "manifest.json (with samples.npz's SHA-256)", "grid.png"]
    monkeypatch.setattr(files, "os", FullDisk(order.index(fails)))
    assert run_sample(tiny_model, out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    assert f"error: {out}" in err and fails in err and ".tmp" not in err  # the file being written, not its temporary
    no_torn_files(out)
    assert (out / "samples.npz").exists() == (fails == "grid.png") and not (out / ".lock").exists()
    monkeypatch.undo()
    assert run_sample(tiny_model, out) == 0
    np.testing.assert_array_equal(images_of(out), images_of(tmp_path / "whole"))


def test_a_failed_rename_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.npz"
    files.save_npz_atomic(path, images=np.ones(3))

    def no_room(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), src, dst)

    monkeypatch.setattr(files.os, "replace", no_room)
    with pytest.raises(OSError) as info:
        files.save_npz_atomic(path, images=np.zeros(3))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["images"], np.ones(3))


def test_bad_out_folders_are_one_line_errors(tiny_model, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, message in ((a_file, f"{a_file} exists and is not a folder"), ("/dev/null", "/dev/null exists and is not a folder"),
                         (a_file / "below", f"{a_file / 'below'}: Not a directory")):
        assert run_sample(tiny_model, out) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        run_sample(tiny_model, "")
    assert exit_info.value.code == 2 and "argument --out: must name a folder, got ''" in capsys.readouterr().err

    class ReadOnly:  # what mkstemp meets in a folder the user cannot write (root can, so it is injected)
        def __getattr__(self, name):
            return getattr(files.tempfile, name)

        def mkstemp(self, prefix="", suffix="", dir=None):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, prefix + "x1y2z3w4" + suffix))

    monkeypatch.setattr(files, "tempfile", ReadOnly())
    assert run_sample(tiny_model, tmp_path / "ro") == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'ro' / 'manifest.json'}: Permission denied" in err and err.count("\n") == 1
    monkeypatch.undo()
    with pytest.raises(ValueError):  # --debug: the exception itself, with its traceback
        run_sample(tiny_model, a_file, "--debug")


# --- 2. folders that are not the command's --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["samples.npz", "grid.png", "shards"])
def test_outputs_without_a_manifest_are_refused_not_adopted(tiny_model, tmp_path, capsys, name):
    out = tmp_path / "theirs"
    out.mkdir()
    if name == "shards":
        (out / "shards").mkdir()
    else:
        (out / name).write_bytes(b"someone else's")
    before = listing(out)
    assert run_sample(tiny_model, out) == 1
    err = capsys.readouterr().err
    assert f"{out} holds {name} but no manifest.json" in err and "wrote" not in err
    assert listing(out) == before


def test_a_foreign_manifest_is_refused(tiny_model, tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my experiment"}')
    assert run_sample(tiny_model, out) == 1
    assert "was not written by this command" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == '{"name": "my experiment"}'


# --- 3. shards checked against the run ------------------------------------------------------------------------


def test_changed_or_foreign_shards_are_named_not_assembled(tiny_model, tmp_path, capsys):
    out, other = tmp_path / "run", tmp_path / "seed1"
    assert run_sample(tiny_model, out) == 0
    assert run_sample(tiny_model, other, seed=1) == 0
    want = images_of(out)
    shard = out / "shards" / "batch_00001.npz"
    kept = arrays_of(shard)
    forgeries = {
        "zeros": dict(images=np.zeros_like(kept["images"])),
        "zeros with the other keys": {**kept, "images": np.zeros_like(kept["images"])},
        "another seed's shard": arrays_of(other / "shards" / "batch_00001.npz"),
        "another batch's shard": arrays_of(out / "shards" / "batch_00000.npz"),
        "floats": {**kept, "images": kept["images"].astype(np.float32)},
    }
    for what, arrays in forgeries.items():
        np.savez(shard, **arrays)
        (out / "samples.npz").unlink(missing_ok=True)
        assert run_sample(tiny_model, out) == 1, what
        err = capsys.readouterr().err
        assert f"shard {shard}" in err and "delete it and rerun" in err, what
        assert not (out / "samples.npz").exists()
    shard.unlink()
    assert run_sample(tiny_model, out) == 0
    np.testing.assert_array_equal(images_of(out), want)


def test_a_replaced_samples_file_without_shards_is_refused(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_sample(tiny_model, out, "--remove-shards") == 0
    assert "samples_sha256" in json.loads((out / "manifest.json").read_text())
    assert run_sample(tiny_model, out, "--remove-shards") == 0  # unchanged: returned as it is
    np.savez(out / "samples.npz", images=np.zeros((6, 8, 8, 3), np.uint8))
    assert run_sample(tiny_model, out, "--remove-shards") == 1
    assert "is not the file this run wrote" in capsys.readouterr().err


# --- 8. sizes ---------------------------------------------------------------------------------------------------


def test_absurd_sizes_are_refused_up_front(tiny_model, tmp_path):
    """A trillion images are refused in seconds (a child process, so that a hang fails the test instead of stalling it)."""
    command = [sys.executable, "-m", "ddim_edu", *sample_args(tiny_model, tmp_path / "big", n=10**12, batch=1)]
    result = subprocess.run(command, env=ONE_THREAD, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "1,000,000,000,000 images of 8×8×3 bytes need" in result.stderr and "are free there" in result.stderr
    assert not (tmp_path / "big").exists()


def test_no_work_per_batch_before_the_first_batch(tiny_model, tmp_path, monkeypatch, capsys):
    """A run of a million batches starts sampling at once: the finished shards are found with one listing."""
    calls = []
    real_shard_path = generate.shard_path
    monkeypatch.setattr(generate, "shard_path", lambda out, k: calls.append(k) or real_shard_path(out, k))

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "sample_batch", stop)
    start = time.monotonic()
    assert run_sample(tiny_model, tmp_path / "many", n=10**6, batch=1) == 130
    assert calls == [] and time.monotonic() - start < 30


# --- 5. and 6. models and weights files --------------------------------------------------------------------------


def one_line_error(capsys, *args):
    assert cli.main(list(args)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_models_configs_methods_and_devices_are_one_line_errors(tiny_unet_config, tiny_model, tmp_path, capsys):
    readme = tmp_path / "readme.txt"
    readme.write_text("hello, this is not a model\n")
    out = str(tmp_path / "out")
    err = one_line_error(capsys, "sample", "--model", str(readme), "--out", out)
    assert "not a torch file (it starts with b'hello, t'" in err
    config = tmp_path / "zeros.json"
    config.write_text('{"block_out_channels": [0, 0]}')
    err = one_line_error(capsys, "sample", "--model", str(readme), "--config", str(config), "--out", out)
    assert "block_out_channels=[0, 0] (positive integers" in err
    folder = tmp_path / "zeros_folder"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({**diffusers_config(tiny_unet_config), "block_out_channels": [0, 0]}))
    with pytest.raises(CheckpointError, match=r"block_out_channels=\[0, 0\]"):
        load_unet(folder)
    for channels in ([], "64", [32, 48], [32, True]):
        with pytest.raises(CheckpointError, match="block_out_channels"):
            pretrained.config_from_diffusers({**diffusers_config(tiny_unet_config), "block_out_channels": channels})
    err = one_line_error(capsys, *sample_args(tiny_model, out, "--method", "dopri5", steps=1))
    assert "method 'dopri5' with final_step='euler' needs at least 2 timesteps, got 1" in err
    err = one_line_error(capsys, *sample_args(tiny_model, out, "--device", "meta"))
    assert "device 'meta' (--device) cannot be used here (it holds shapes, no data)" in err
    assert not Path(out).exists()


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_a_command_is_refused_by_name(tmp_path, capsys):
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"format": "ddim_edu.image_training/1", "step": 1, "ema": {"w": RunsACommand(marker)}}, checkpoint)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps({"conv_in.weight": RunsACommand(marker)}, protocol=4))
    refused = r"was refused because unpickling it would import (posix|nt|os)\.system"
    for path in (checkpoint, plain):
        with pytest.raises(ValueError, match=refused):
            load_weights_only(path)
        for flag in ("--model", "--checkpoint"):
            err = one_line_error(capsys, "sample", flag, str(path), "--out", str(tmp_path / "out"))
            assert "posix.system" in err or "os.system" in err or "nt.system" in err
            assert "truncated or corrupt" not in err and "weights_only=False" not in err
    assert not marker.exists()


def test_an_unreadable_weights_file_says_so_and_why(tiny_unet_config, tmp_path, monkeypatch, capsys):
    """Root reads a 0600 file of another owner, so the refusal is injected where the file is opened."""
    path = tmp_path / "model.pt"
    torch.save(UNet(tiny_unet_config).state_dict(), path)

    def denied(file, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(ValueError, match=r"model\.pt cannot be read: Permission denied \(PermissionError\)"):
        load_weights_only(path)
    err = one_line_error(capsys, "sample", "--model", str(path), "--out", str(tmp_path / "out"))
    assert "cannot be read: Permission denied" in err and "corrupt" not in err
    monkeypatch.undo()

    safetensors = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file(UNet(tiny_unet_config).state_dict(), str(safetensors))
    monkeypatch.setattr(pretrained, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read: Permission denied \(PermissionError\)"):
        pretrained.read_state_dict(safetensors)


# --- 7. hostile and damaged archives ------------------------------------------------------------------------------


def cifar_archive(path, extra=()):
    """A small binary-version archive (3 records per file), plus ``extra`` (name, bytes or a TarInfo) members."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for name in (*data.CIFAR10_FILES["train"], *data.CIFAR10_FILES["test"]):
            records = rng.integers(0, 256, size=(3, data.RECORD_BYTES), dtype=np.uint8)
            records[:, 0] %= 10
            info = tarfile.TarInfo(f"{data.CIFAR10_FOLDER}/{name}")
            info.size = records.size
            tar.addfile(info, io.BytesIO(records.tobytes()))
        for member in extra:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return path


def test_a_truncated_archive_is_a_clear_error_wherever_it_is_cut(tmp_path):
    whole = cifar_archive(tmp_path / "whole.tar.gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    for length in sorted({*range(0, 64, 3), *np.linspace(64, len(whole) - 200, 30).astype(int).tolist()}):
        cut.write_bytes(whole[:length])
        for read in (lambda: load_cifar10(cut, "train", records_per_file=None),
                     lambda: load_cifar10(cut, "test", records_per_file=None),
                     lambda: extract_cifar10(cut, tmp_path / f"dest{length}")):
            with pytest.raises(ValueError, match="truncated|not a readable tar archive"):
                read()
        for part in (tmp_path / f"dest{length}").rglob("*"):  # whatever was extracted is whole: no .part file
            assert not part.name.endswith(".part")


def test_archive_members_escaping_the_folder_are_refused(tmp_path):
    link = tarfile.TarInfo(f"{data.CIFAR10_FOLDER}/test_batch.bin")
    link.type, link.linkname = tarfile.LNKTYPE, "../../outside.bin"
    for i, member in enumerate([("../outside.bin", b"x" * 3073), (str(tmp_path / "outside.bin"), b"x" * 3073),
                                (f"{data.CIFAR10_FOLDER}/../../outside.bin", b"x" * 3073), link]):
        archive = cifar_archive(tmp_path / f"evil{i}.tar.gz", extra=[member])
        dest = tmp_path / f"dest{i}"
        with pytest.raises(ValueError, match="unsafe member name|not a regular file"):
            extract_cifar10(archive, dest)
        assert not dest.exists()
        try:  # read in memory: the member is never read, or is refused
            images, _ = load_cifar10(archive, "test", records_per_file=None)
            assert len(images) == 3
        except ValueError as e:
            assert "not a regular file" in str(e)
    assert not (tmp_path / "outside.bin").exists() and not (tmp_path.parent / "outside.bin").exists()
