"""Packaging checks: pyproject.toml and environment.yml list the same dependencies, and the
torch that `make test` installs first is the CPU-wheel release the project is tested with."""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, canonicalize_version
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# The torch release CI installs as a CPU wheel (the Makefile's default TORCH). A newer pin
# would make a CPU-only machine download the CUDA build from PyPI instead.
TESTED_TORCH = Version("2.13.0")


# --- parsing --------------------------------------------------------------------------------


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _environment() -> dict:
    with open(ROOT / "environment.yml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def _normalized(req: Requirement) -> str:
    """A requirement as a comparable string: canonical name, extras, specifiers, marker."""
    specs = sorted(f"{s.operator}{canonicalize_version(s.version) if '*' not in s.version else s.version}" for s in req.specifier)
    out = canonicalize_name(req.name)
    if req.extras:
        out += "[" + ",".join(sorted(canonicalize_name(e) for e in req.extras)) + "]"
    out += ",".join(specs)
    if req.marker is not None:
        out += f"; {req.marker}"
    return out


def _pyproject_requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for the base dependencies and every optional extra."""
    project = _pyproject()["project"]
    reqs = [("dependencies", Requirement(r)) for r in project.get("dependencies", [])]
    for extra, lines in project.get("optional-dependencies", {}).items():
        reqs += [(f"extra '{extra}'", Requirement(r)) for r in lines]
    return reqs


def _environment_pip_lines() -> list[str]:
    pip_sections = [d["pip"] for d in _environment()["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, f"environment.yml should have exactly one pip: section, found {len(pip_sections)}"
    return [str(line).strip() for line in pip_sections[0]]


def _environment_requirements() -> list[Requirement]:
    reqs = []
    for line in _environment_pip_lines():
        if line.startswith("-"):  # pip options such as `-e .`
            continue
        try:
            reqs.append(Requirement(line))
        except InvalidRequirement as err:
            pytest.fail(f"environment.yml pip entry {line!r} is not a valid requirement: {err}")
    return reqs


def _makefile_torch() -> Requirement:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    m = re.search(r"^TORCH\s*\?=\s*(.+?)\s*$", text, flags=re.MULTILINE)
    assert m, "Makefile should set a default torch requirement with `TORCH ?= ...`"
    return Requirement(m.group(1).strip("'\""))


def _torch_specs() -> dict[str, SpecifierSet]:
    specs = {f"pyproject.toml {where}": r.specifier for where, r in _pyproject_requirements() if canonicalize_name(r.name) == "torch"}
    specs |= {"environment.yml": r.specifier for r in _environment_requirements() if canonicalize_name(r.name) == "torch"}
    return specs


# --- pyproject.toml <-> environment.yml -------------------------------------------------------


def test_pyproject_lists_each_dependency_once():
    seen: dict[str, tuple[str, str]] = {}
    clashes = []
    for where, req in _pyproject_requirements():
        name = canonicalize_name(req.name)
        if name in seen and seen[name][1] != _normalized(req):
            clashes.append(f"{name}: {seen[name][1]!r} in {seen[name][0]} vs {_normalized(req)!r} in {where}")
        seen.setdefault(name, (where, _normalized(req)))
    assert not clashes, "pyproject.toml requires a package with different specifiers in different places:\n  " + "\n  ".join(clashes)


def test_environment_yml_matches_pyproject():
    ours = {canonicalize_name(r.name): (where, _normalized(r)) for where, r in _pyproject_requirements()}
    theirs: dict[str, str] = {}
    for r in _environment_requirements():
        name = canonicalize_name(r.name)
        assert name not in theirs, f"environment.yml lists {name} twice"
        theirs[name] = _normalized(r)

    problems = []
    for name in sorted(ours.keys() - theirs.keys()):
        problems.append(f"missing from environment.yml: {ours[name][1]} (pyproject.toml {ours[name][0]})")
    for name in sorted(theirs.keys() - ours.keys()):
        problems.append(f"only in environment.yml: {theirs[name]}")
    for name in sorted(ours.keys() & theirs.keys()):
        if ours[name][1] != theirs[name]:
            problems.append(f"{name} differs: pyproject.toml {ours[name][1]!r} vs environment.yml {theirs[name]!r}")
    assert not problems, "environment.yml has drifted from pyproject.toml:\n  " + "\n  ".join(problems)


def test_environment_yml_installs_this_package_and_a_supported_python():
    env = _environment()
    assert "conda-forge" in env.get("channels", [])
    assert any(line.startswith("-e") and line[2:].strip() == "." for line in _environment_pip_lines()), (
        "environment.yml should install the repository itself (`-e .`) so notebooks can import ddim_edu"
    )
    plain = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "pip" in plain, "environment.yml needs conda's pip to install the pip: section"
    pythons = [d for d in plain if re.match(r"python\b", d)]
    assert len(pythons) == 1, f"environment.yml should list python once, found {pythons}"
    requires_python = SpecifierSet(_pyproject()["project"]["requires-python"])
    m = re.fullmatch(r"python\s*(==?|>=)?\s*([0-9.]+)?(\.\*)?", pythons[0])
    assert m, f"unexpected python spec in environment.yml: {pythons[0]!r}"
    if m.group(2):  # conda's `python=3.11` means 3.11.*; its lowest release must be allowed
        assert Version(m.group(2)) in requires_python, (
            f"environment.yml {pythons[0]!r} is outside pyproject.toml requires-python {requires_python}"
        )


def test_no_gpu_specific_requirements():
    """Nothing may force a CUDA build or a GPU-only package on a Mac or a CPU-only machine."""
    bad = [_normalized(r) for _, r in _pyproject_requirements() if canonicalize_name(r.name).startswith("nvidia-")]
    bad += [_normalized(r) for r in _environment_requirements() if canonicalize_name(r.name).startswith("nvidia-")]
    for spec in list(_torch_specs().values()) + [_makefile_torch().specifier]:
        bad += [f"torch{s}" for s in spec if "+" in s.version]  # local labels such as +cu121 or +cpu
    bad += [line for line in _environment_pip_lines() if line.startswith(("--index-url", "--extra-index-url", "-i ", "-f ", "--find-links"))]
    assert not bad, f"platform-specific requirements or indexes found: {bad}"


# --- the torch `make test` installs ---------------------------------------------------------


def test_makefile_pins_the_tested_torch_release_exactly():
    req = _makefile_torch()
    assert canonicalize_name(req.name) == "torch", f"Makefile TORCH should name torch, got {req}"
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
        f"Makefile TORCH should pin one release with ==, got {req}; a range lets pip move to a newer (CUDA) build"
    )
    pinned = Version(specs[0].version)
    assert pinned == TESTED_TORCH, f"Makefile pins torch {pinned}, but CI provides the CPU wheel of {TESTED_TORCH}"
    # The CPU wheel carries a local label; `==X` must accept it (`===X` or `==X+cu...` would not).
    assert req.specifier.contains(f"{pinned}+cpu"), f"{req} does not accept the CPU wheel {pinned}+cpu"


def test_every_torch_range_admits_the_pinned_release():
    pinned = next(iter(_makefile_torch().specifier)).version
    specs = _torch_specs()
    assert "environment.yml" in specs and any(k.startswith("pyproject.toml dependencies") for k in specs), (
        f"torch should be required by pyproject.toml's dependencies and by environment.yml, found in {sorted(specs)}"
    )
    rejecting = {where: str(spec) for where, spec in specs.items() if not spec.contains(pinned)}
    assert not rejecting, f"torch {pinned} (Makefile TORCH) is rejected by: {rejecting}"


def test_makefile_repeats_the_torch_pin_when_installing_the_package():
    """Installing the package together with $(TORCH) stops the resolver from swapping torch."""
    lines = [ln.strip() for ln in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines()]
    package_installs = [ln for ln in lines if ("$(PIP) install" in ln or "pip install" in ln) and " -e " in ln]
    assert package_installs, "Makefile should install the package with `pip install ... -e ...`"
    unpinned = [ln for ln in package_installs if '"$(TORCH)"' not in ln]
    assert not unpinned, f"these Makefile installs do not repeat $(TORCH): {unpinned}"


# --- the built package --------------------------------------------------------------------------


def test_packages_are_ddim_edu_and_its_data():
    """pyproject.toml lists the packages (a mapped data folder is invisible to packages.find): exactly the
    folders of ddim_edu/ that are packages, and ddim_edu.toy_data mapped onto the top-level toy_data/."""
    setuptools = _pyproject()["tool"]["setuptools"]
    on_disk = {"ddim_edu." + ".".join(p.parent.relative_to(ROOT / "ddim_edu").parts) if p.parent != ROOT / "ddim_edu"
               else "ddim_edu" for p in (ROOT / "ddim_edu").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"ddim_edu.toy_data"}
    assert setuptools["package-dir"] == {"ddim_edu.toy_data": "toy_data"}


def test_installed_metadata_version_matches_the_source():
    try:
        installed = metadata.version("ddim-edu")
    except metadata.PackageNotFoundError:
        pytest.skip("ddim-edu is not installed (pip install -e .)")
    import ddim_edu

    assert Version(installed) == Version(ddim_edu.__version__)
