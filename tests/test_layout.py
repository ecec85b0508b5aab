"""The package's shape: the paper's core imports none of the legs, evaluation or the command line; every
module says what it exports."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ddim_edu"
CORE = {"schedules", "forward", "model", "sampling", "ode", "solvers", "sde", "likelihood", "theorem1", "mixture",
        "interpolation", "paper", "training", "__init__"}
# Which layers a layer may import (besides the standard library and third-party packages).
ALLOWED = {
    "core": {"core", "utils"},
    "utils": {"utils"},
    "toy": {"core", "utils", "toy"},
    "image": {"core", "utils", "image"},
    "evaluation": {"core", "utils", "image", "evaluation"},
    "interop": {"core", "utils"},
    "top": {"core", "utils", "toy", "image", "evaluation", "interop", "top"},  # cli, demo, exercises, __main__
}


def layer(module: str) -> str:
    """The layer of a module name relative to the package, e.g. 'solvers' -> core, 'image.unet' -> image."""
    head = module.split(".")[0]
    if head in ("toy", "image", "evaluation", "utils", "interop"):
        return head
    if head in CORE:
        return "core"
    if head in ("cli", "demo", "exercises", "__main__"):
        return "top"
    raise AssertionError(f"ddim_edu.{module} belongs to no layer: add it to tests/test_layout.py")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield ".".join(path.relative_to(PACKAGE).with_suffix("").parts), path


def package_imports(module: str, path: Path):
    """The ddim_edu modules that ``module`` imports anywhere in its file (functions included), relative to ddim_edu."""
    package = module.split(".")[:-1]  # the package a relative import starts from
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *([node.module] if node.module else [])])
                names = [target] if node.module else [f"{target}.{a.name}".lstrip(".") for a in node.names]
                names = [f"ddim_edu.{n}" if n else "ddim_edu" for n in names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            if name == "ddim_edu":
                yield "__init__"
            elif name.startswith("ddim_edu."):
                yield name[len("ddim_edu."):]


def test_every_module_belongs_to_a_layer_and_imports_only_what_its_layer_may():
    bad = []
    for module, path in modules():
        mine = layer(module)
        for imported in package_imports(module, path):
            theirs = layer(imported)
            if theirs not in ALLOWED[mine]:
                bad.append(f"ddim_edu.{module} ({mine}) imports ddim_edu.{imported} ({theirs})")
    assert not bad, "\n".join(bad)


def test_importing_the_core_loads_no_leg():
    """The real import graph (what Python loads), not only the import statements."""
    core = [f"ddim_edu.{m}" for m in sorted(CORE - {"__init__"})]
    code = (f"import sys; import {', '.join(core)}; "
            "print(sorted(m for m in sys.modules if m.startswith('ddim_edu.') and m.split('.')[1] not in "
            f"{sorted(CORE)!r} and m.split('.')[1] != 'utils'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("module", [m for m, _ in modules() if m != "__main__"])
def test_every_module_declares_all_and_it_exists(module):
    imported = importlib.import_module("ddim_edu" if module == "__init__" else f"ddim_edu.{module.removesuffix('.__init__')}")
    assert hasattr(imported, "__all__"), f"ddim_edu.{module} has no __all__"
    missing = [name for name in imported.__all__ if not hasattr(imported, name)
               and importlib.util.find_spec(f"{imported.__name__}.{name}") is None]
    assert not missing, f"ddim_edu.{module}.__all__ names what it does not define: {missing}"


def test_the_top_level_namespace_is_short_and_curated():
    import ddim_edu

    public = {n for n in dir(ddim_edu) if not n.startswith("_")} - set(ddim_edu.__all__)
    submodules = {n for n in public if isinstance(getattr(ddim_edu, n), type(ddim_edu))}
    assert public == submodules  # nothing public beyond __all__ but the submodules themselves
    assert len(ddim_edu.__all__) <= 15
