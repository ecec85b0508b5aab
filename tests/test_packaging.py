"""The package as a wheel installs it: the data files of ``toy_data/`` ship inside it and are found with
no repository around, and every module of ``ddim_edu/`` is in the wheel (pyproject.toml lists the packages).

The wheel is built from a copy of the repository, so no build/ or egg-info folder is left here, and installed
(not editable) into a fresh virtual environment that borrows this environment's third-party packages (torch,
numpy, ...) through a ``.pth`` path line. Such a line only extends ``sys.path``: the ``.pth`` files in the
borrowed folder, among them the editable install's finder, are not run there, so ``ddim_edu`` can only come
from the wheel. Nothing is downloaded (``--no-index``, ``--no-build-isolation``).
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import Version

from ddim_edu.evaluation.digits import CLASSIFIER_FILE
from ddim_edu.image.data import OFFLINE_PHOTO_FILE, load_offline_images
from ddim_edu.image.pretrained import NAMED_MODELS, load_unet
from ddim_edu.toy.datasets import DATASETS, load_frozen
from ddim_edu.utils.package_data import DATA_PACKAGE, package_file

ROOT = Path(__file__).resolve().parents[1]
# What the build reads: the project file, the README its metadata names, the sources and the data folder.
BUILD_INPUTS = ("pyproject.toml", "README.md", "ddim_edu", "toy_data")
DATA_FILES = (*[f"{name}.csv" for name in DATASETS], OFFLINE_PHOTO_FILE, CLASSIFIER_FILE,
              *[f for files in NAMED_MODELS.values() for f in files])
DATA_DIR_IN_WHEEL = DATA_PACKAGE.replace(".", "/")
DEMO_FILES = ("samples.png", "table1_toy.png", "table1_toy.md", "table1_toy.csv")

# The subprocesses see neither this session's PYTHONPATH (which could put the repository on sys.path) nor pip's
# configuration; one torch thread keeps the demo quick on a small machine.
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))} | {
    "OMP_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_NO_INPUT": "1",
}

# Run in the fresh environment: where everything was imported from, and what the loaders return.
CHECK = """
import json, sys
import ddim_edu, ddim_edu.toy_data
from ddim_edu.image.data import load_offline_images
from ddim_edu.image.pretrained import load_unet
from ddim_edu.toy.datasets import DATASETS, load_frozen
from ddim_edu.utils.package_data import package_file

frozen = {name: load_frozen(name) for name in DATASETS}
images = load_offline_images(size=8, n=4)
digits = load_unet("digits")
print(json.dumps({
    "ddim_edu": ddim_edu.__file__,
    "toy_data": ddim_edu.toy_data.__file__,
    "photo": str(package_file("grace_hopper_half.npz")),
    "digits_unet": str(package_file("digits_unet.safetensors")),
    "editable": sorted(m for m in sys.modules if m.startswith("__editable__"))
                + [repr(f) for f in sys.meta_path if "__editable__" in getattr(f, "__module__", "")],
    "frozen": {name: [list(x.shape), x.double().sum().item()] for name, x in frozen.items()},
    "images": [list(images.shape), images.double().sum().item()],
    "digits": sum(p.double().sum().item() for p in digits.parameters()),
}))
"""


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def _inside(path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel, copy): the wheel built from a copy of the repository's build inputs, and that copy."""
    try:
        setuptools = Version(metadata.version("setuptools"))
    except metadata.PackageNotFoundError:
        setuptools = None
    if setuptools is None or setuptools < Version("70.1"):
        pytest.skip(f"building the wheel here needs setuptools >= 70.1 (the dev extra), found {setuptools}")
    base = tmp_path_factory.mktemp("packaging")
    copy = base / "repository"
    copy.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in BUILD_INPUTS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=ignore)
        else:
            shutil.copy2(source, copy / name)
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, copy])
    wheels = list(dist.glob("ddim_edu-*.whl"))
    assert len(wheels) == 1, f"expected one ddim_edu wheel in {dist}, found {[w.name for w in dist.iterdir()]}"
    return wheels[0], copy


def _fresh_venv(path: Path) -> tuple[Path, list]:
    """A new virtual environment at ``path``: its python, and the pip command that installs into it.

    Made without pip it takes a fraction of a second (ensurepip takes seconds); this environment's pip then
    installs into it with ``--python``, an option of pip 22.3 and later.
    """
    fast = Version(metadata.version("pip")) >= Version("22.3")
    _run([sys.executable, "-m", "venv", *(["--without-pip"] if fast else []), path])
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    pip = [sys.executable, "-m", "pip", "--python", python] if fast else [python, "-m", "pip"]
    return python, pip


def test_package_file_takes_a_file_name_only():
    assert package_file("README.md").is_file()
    for bad in ("", "..", "../pyproject.toml", "sub/x.csv", 3):
        with pytest.raises(ValueError, match="name must be the name of a file"):
            package_file(bad)


def test_wheel_holds_the_data_and_every_module(built):
    wheel, copy = built
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in (*DATA_FILES, "__init__.py", "README.md") if f"{DATA_DIR_IN_WHEEL}/{f}" not in names]
    assert not missing, f"{wheel.name} lacks these files of toy_data/ (package data in pyproject.toml): {missing}"
    modules = {p.relative_to(copy).as_posix() for p in (copy / "ddim_edu").rglob("*.py")}
    assert not modules - names, (
        f"{wheel.name} lacks {sorted(modules - names)}: add their packages to [tool.setuptools] packages in pyproject.toml"
    )
    stray = sorted(n for n in names if not n.startswith(("ddim_edu/", "ddim_edu-")))
    assert not stray, f"{wheel.name} installs files outside ddim_edu: {stray}"


def test_wheel_install_finds_the_data_outside_the_repository(built, tmp_path):
    wheel, _ = built
    venv = tmp_path / "venv"
    python, pip = _fresh_venv(venv)
    _run([*pip, "install", "--no-deps", "--no-index", "-q", wheel])
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    borrowed = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (purelib / "borrowed_site_packages.pth").write_text("".join(f"{d}\n" for d in borrowed if Path(d).is_dir()))
    work = tmp_path / "work"  # the working directory: outside the repository, so nothing there can be imported
    work.mkdir()

    found = json.loads(_run([python, "-c", CHECK], cwd=work).stdout.strip().splitlines()[-1])
    assert found["editable"] == [], f"the editable install's finder is active in the fresh environment: {found['editable']}"
    for key in ("ddim_edu", "toy_data", "photo", "digits_unet"):
        assert _inside(found[key], venv) and not _inside(found[key], ROOT), f"{key} came from {found[key]}, not the wheel"
    for name in DATASETS:
        expected = load_frozen(name).double()
        assert found["frozen"][name][0] == list(expected.shape), name
        assert found["frozen"][name][1] == pytest.approx(expected.sum().item(), abs=1e-6), name
    images = load_offline_images(size=8, n=4).double()
    assert found["images"][0] == list(images.shape) == [4, 3, 8, 8]
    assert found["images"][1] == pytest.approx(images.sum().item(), abs=1e-6)
    assert found["digits"] == sum(p.double().sum().item() for p in load_unet("digits").parameters())

    out = tmp_path / "demo"
    _run([python, "-m", "ddim_edu.demo", "--fast", "--n-samples", "200", "--out", out], cwd=work)
    for name in DEMO_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"the demo did not write {name}"
