"""CIFAR-10 readers, binary and python versions (on small archives written here in the official formats), and the offline photo patches."""
import io
import tarfile

import numpy as np
import pytest
import torch

from ddim_edu.image import data
from ddim_edu.image.data import (
    CIFAR10_ENV,
    CIFAR10_URL,
    extract_cifar10,
    float_to_pixels,
    load_cifar10,
    load_offline_images,
    load_offline_photo,
    pixels_to_float,
)

COUNTS = {"data_batch_1.bin": 3, "data_batch_2.bin": 3, "data_batch_3.bin": 3, "data_batch_4.bin": 3,
          "data_batch_5.bin": 3, "test_batch.bin": 2}


def fake_records(n, seed):
    """n records in the official layout, and the images [n, 3, 32, 32] and labels they must decode to."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    raw = bytearray()
    for img, lab in zip(images, labels):
        raw.append(int(lab))
        for c in range(3):  # R plane, G plane, B plane, each row by row
            for row in range(32):
                raw.extend(img[c, row].tobytes())
    return bytes(raw), images, labels


@pytest.fixture
def cifar_dir(tmp_path):
    """A ``cifar-10-batches-bin`` folder with a few records per file; returns (folder, expected)."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    expected = {}
    for i, (name, n) in enumerate(COUNTS.items()):
        raw, images, labels = fake_records(n, seed=i)
        (folder / name).write_bytes(raw)
        expected[name] = (images, labels)
    (folder / "batches.meta.txt").write_text("\n".join(data.CIFAR10_CLASSES) + "\n")
    return folder, expected


def make_tar(path, folder, extra=()):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")
        for name, payload in extra:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def expected_split(expected, split):
    names = data.CIFAR10_FILES[split]
    return (np.concatenate([expected[n][0] for n in names]), np.concatenate([expected[n][1] for n in names]))


def test_record_layout_is_label_then_chw():
    raw, images, labels = fake_records(1, seed=5)
    assert len(raw) == 3073 and raw[0] == labels[0]
    # byte 1 + c*1024 + row*32 + col is pixel (c, row, col)
    assert raw[1 + 2 * 1024 + 7 * 32 + 30] == images[0, 2, 7, 30]
    got, got_labels = data._parse_records(raw, "one record", None)
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)


@pytest.mark.parametrize("split", ["train", "test"])
def test_folder_reads_back_exactly(cifar_dir, split):
    folder, expected = cifar_dir
    images, labels = load_cifar10(folder, split, records_per_file=None)
    want_images, want_labels = expected_split(expected, split)
    assert images.dtype == torch.uint8 and images.shape == (len(want_labels), 3, 32, 32)
    assert labels.dtype == torch.int64
    assert np.array_equal(images.numpy(), want_images) and np.array_equal(labels.numpy(), want_labels)
    # the parent folder works too
    images2, _ = load_cifar10(folder.parent, split, records_per_file=None)
    assert torch.equal(images, images2)


def test_archive_reads_back_exactly_without_extracting(cifar_dir, tmp_path):
    folder, expected = cifar_dir
    (tmp_path / "archive").mkdir()
    archive = make_tar(tmp_path / "archive" / "cifar-10-binary.tar.gz", folder)
    before = sorted(p.name for p in archive.parent.iterdir())
    for split in ("train", "test"):
        images, labels = load_cifar10(archive, split, records_per_file=None)
        want_images, want_labels = expected_split(expected, split)
        assert np.array_equal(images.numpy(), want_images) and np.array_equal(labels.numpy(), want_labels)
    assert sorted(p.name for p in archive.parent.iterdir()) == before  # nothing written
    # a folder that holds the archive is accepted as well
    assert torch.equal(load_cifar10(archive.parent, "test", records_per_file=None)[0], images)


def test_environment_variable(cifar_dir, monkeypatch):
    folder, expected = cifar_dir
    monkeypatch.setenv(CIFAR10_ENV, str(folder))
    images, _ = load_cifar10(split="test", records_per_file=None)
    assert np.array_equal(images.numpy(), expected["test_batch.bin"][0])


def test_missing_data_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.delenv(CIFAR10_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10()
    assert CIFAR10_URL in str(err.value) and "curl -O" in str(err.value) and CIFAR10_ENV in str(err.value)
    with pytest.raises(FileNotFoundError, match="curl -O"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="curl -O"):
        load_cifar10(tmp_path)  # an empty folder
    monkeypatch.setenv(CIFAR10_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_cifar10()


def test_incomplete_folder(cifar_dir):
    folder, _ = cifar_dir
    (folder / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4.bin"):
        load_cifar10(folder, records_per_file=None)
    load_cifar10(folder, "test", records_per_file=None)  # the test split is complete


def test_corrupt_data(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    # the default expects the real data's 10000 records per file
    with pytest.raises(ValueError, match="holds 2 records, expected 10000"):
        load_cifar10(folder, "test")
    path = folder / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-5])  # truncated
    with pytest.raises(ValueError, match="multiple of the record size 3073"):
        load_cifar10(folder, "test", records_per_file=None)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="multiple of the record size"):
        load_cifar10(folder, "test", records_per_file=None)
    raw = bytearray(fake_records(2, seed=0)[0])
    raw[3073] = 17  # a label outside 0..9
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="labels lie in 0..9"):
        load_cifar10(folder, "test", records_per_file=None)
    # a truncated archive, and a file that is no archive
    good = make_tar(tmp_path / "good.tar.gz", folder)
    (tmp_path / "cut.tar.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_cifar10(tmp_path / "cut.tar.gz", records_per_file=None)
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        load_cifar10(tmp_path / "junk.tar.gz")
    with pytest.raises(ValueError, match="split must be one of"):
        load_cifar10(folder, "validation")


# --- the python version: Python 2 pickles, read by a restricted unpickler ---------------------------


def py2_pickle(obj) -> bytes:
    """``obj`` as Python 2's cPickle (protocol 2) wrote the official batches: byte strings as (SHORT_)BINSTRING,
    numpy arrays through ``numpy.core.multiarray._reconstruct`` and a BUILD with numpy's state tuple.
    Handles what a batch holds: dict, list, tuple, int, bool, None, bytes and uint8 arrays."""
    out = bytearray(b"\x80\x02")

    def put(o):
        if o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"K" + bytes([o]) if 0 <= o < 256 else b"M" + o.to_bytes(2, "little") if 0 <= o < 65536
                       else b"J" + o.to_bytes(4, "little", signed=True))
        elif isinstance(o, bytes):
            out.extend((b"U" + bytes([len(o)]) if len(o) < 256 else b"T" + len(o).to_bytes(4, "little")) + o)
        elif isinstance(o, tuple):
            if 1 <= len(o) <= 3:
                for item in o:
                    put(item)
                out.extend(b"\x85\x86\x87"[len(o) - 1:len(o)])
            else:
                out.extend(b"(")
                for item in o:
                    put(item)
                out.extend(b"t")
        elif isinstance(o, list):
            out.extend(b"](")
            for item in o:
                put(item)
            out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                put(k)
                put(v)
            out.extend(b"u")
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            put((0,))
            put(b"b")
            out.extend(b"\x87R(")  # _reconstruct(ndarray, (0,), 'b'), then its state:
            put(1)
            put(o.shape)
            out.extend(b"cnumpy\ndtype\n")
            put((b"u1", 0, 1))
            out.extend(b"R")
            put((3, b"|", None, None, None, -1, -1, 0))
            out.extend(b"b")  # the dtype's state
            put(False)
            put(o.tobytes())
            out.extend(b"tb")  # the array's state
        else:
            raise TypeError(type(o))

    put(obj)
    return bytes(out + b".")


def py2_batch(images, labels, name="training batch 1 of 5"):
    return py2_pickle({b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
                       b"data": images.reshape(len(images), -1), b"filenames": [b"x_%d.png" % i for i in range(len(images))]})


@pytest.fixture
def cifar_python_dir(cifar_dir, tmp_path):
    """The same records as ``cifar_dir``, as the python version's ``cifar-10-batches-py`` folder."""
    _, expected = cifar_dir
    folder = tmp_path / "py" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, (images, labels) in expected.items():
        (folder / name.removesuffix(".bin")).write_bytes(py2_batch(images, labels))
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": [c.encode() for c in data.CIFAR10_CLASSES]}))
    return folder, expected


def test_python_batch_is_the_python2_stream_numpy_reads():
    """The test's writer makes the stream numpy's own unpickling accepts, and the restricted reader decodes it alike."""
    import pickle

    _, images, labels = fake_records(3, seed=9)
    raw = py2_batch(images, labels)
    plain = pickle.loads(raw, encoding="latin1")  # trusted here: the test wrote it
    assert np.array_equal(plain["data"], images.reshape(3, -1)) and plain["labels"] == labels.tolist()
    got, got_labels = data._parse_pickle_batch(raw, "a batch", None)
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)


@pytest.mark.parametrize("split", ["train", "test"])
def test_python_version_reads_back_exactly(cifar_python_dir, tmp_path, split):
    folder, expected = cifar_python_dir
    want_images, want_labels = expected_split(expected, split)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    for source in (folder, folder.parent, archive, tmp_path):  # the folder, its parent, the archive, its folder
        images, labels = load_cifar10(source, split, records_per_file=None)
        assert np.array_equal(images.numpy(), want_images) and np.array_equal(labels.numpy(), want_labels), source
    out = extract_cifar10(archive, tmp_path / "out")
    assert out == tmp_path / "out" / "cifar-10-batches-py"
    assert sorted(p.name for p in out.iterdir()) == sorted([n.removesuffix(".bin") for n in COUNTS] + ["batches.meta"])
    assert np.array_equal(load_cifar10(out, split, records_per_file=None)[0].numpy(), want_images)


def test_python_batch_refuses_any_other_import(tmp_path):
    """A pickle that would run a command is refused before the import is made: nothing runs."""
    import os
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Payload(), "labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match=r"refused: it asks to import (posix|os)\.system"):
        load_cifar10(folder, "test", records_per_file=None)
    assert not marker.exists()


def test_python_batch_corrupt_or_foreign(tmp_path):
    _, images, labels = fake_records(4, seed=2)
    raw = py2_batch(images, labels)
    parse = data._parse_pickle_batch
    with pytest.raises(ValueError, match="truncated or corrupt"):
        parse(raw[: len(raw) // 2], "cut", None)
    with pytest.raises(ValueError, match="refused: an array of dtype"):  # float data: not CIFAR-10
        parse(raw.replace(b"U\x02u1", b"U\x02f4"), "floats", None)
    with pytest.raises(ValueError, match="labels up to 12"):
        parse(py2_batch(images, [0, 1, 12, 3]), "labels", None)
    with pytest.raises(ValueError, match="'labels' list of 4"):
        parse(py2_batch(images, [0, 1, 2]), "short labels", None)
    with pytest.raises(ValueError, match="holds 4 records, expected 10000"):
        parse(raw, "few", 10000)
    with pytest.raises(ValueError, match="no 'data' array"):
        parse(py2_pickle({b"labels": [1]}), "no data", None)


def test_extract_round_trip_and_refuses_path_traversal(cifar_dir, tmp_path):
    folder, expected = cifar_dir
    archive = make_tar(tmp_path / "cifar-10-binary.tar.gz", folder)
    out = extract_cifar10(archive, tmp_path / "out")
    assert out == tmp_path / "out" / "cifar-10-batches-bin"
    assert sorted(p.name for p in out.iterdir()) == sorted([*COUNTS, "batches.meta.txt"])
    images, _ = load_cifar10(out, records_per_file=None)
    assert np.array_equal(images.numpy(), expected_split(expected, "train")[0])

    for bad in ("../evil.bin", "/tmp/evil.bin", "cifar-10-batches-bin/../../evil.bin"):
        evil = make_tar(tmp_path / "evil.tar.gz", folder, extra=[(bad, b"x" * 3073)])
        with pytest.raises(ValueError, match="unsafe member name"):
            extract_cifar10(evil, tmp_path / "dest")
        assert not (tmp_path / "dest").exists() and not (tmp_path / "evil.bin").exists()
    # a symlink member is refused, by extraction and by reading in memory
    link = tmp_path / "link.tar.gz"
    with tarfile.open(link, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="not a regular file"):
        extract_cifar10(link, tmp_path / "dest")
    with pytest.raises(ValueError, match="not a regular file"):
        load_cifar10(link, "test", records_per_file=None)


def test_pixel_mapping_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8)
    x = pixels_to_float(pixels)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert torch.equal(float_to_pixels(x), pixels)
    assert torch.equal(float_to_pixels(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pixels_to_float(x)


def test_offline_images_shape_range_determinism():
    x = load_offline_images(size=16, n=64, seed=0)
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.2  # real variety, not a flat image
    assert torch.equal(x, load_offline_images(size=16, n=64, seed=0))
    assert not torch.equal(x, load_offline_images(size=16, n=64, seed=1))
    assert load_offline_images(size=32, n=3).shape == (3, 3, 32, 32)
    # each patch is a crop of the photo at the seeded corners
    photo = load_offline_photo()
    g = torch.Generator().manual_seed(0)
    top = torch.randint(0, photo.shape[1] - 15, (64,), generator=g)
    left = torch.randint(0, photo.shape[2] - 15, (64,), generator=g)
    for i in (0, 17, 63):
        crop = photo[:, top[i]:top[i] + 16, left[i]:left[i] + 16]
        assert torch.equal(float_to_pixels(x[i]), crop)
    with pytest.raises(ValueError, match="size must be at most"):
        load_offline_images(size=1000)
    with pytest.raises(ValueError, match="n must be a positive int"):
        load_offline_images(n=0)


def test_missing_photo_says_how_to_rebuild_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "package_file", lambda name: tmp_path / name)
    with pytest.raises(FileNotFoundError) as err:
        load_offline_photo()
    message = str(err.value)
    assert str(tmp_path / data.OFFLINE_PHOTO_FILE) in message
    assert f"make_offline_photo('toy_data/{data.OFFLINE_PHOTO_FILE}')" in message


def test_frozen_photo_matches_its_source():
    """The frozen file is matplotlib's bundled sample photo halved (up to JPEG decoder differences)."""
    pytest.importorskip("PIL")
    photo = load_offline_photo()
    assert photo.shape == (3, 300, 256) and photo.dtype == torch.uint8
    try:
        rebuilt = torch.from_numpy(data.make_offline_photo())
    except (FileNotFoundError, OSError):
        pytest.skip("matplotlib's sample data is not installed")
    diff = (rebuilt.int() - photo.int()).abs()
    assert diff.max() <= 3 and diff.float().mean() < 0.5
