"""The data files that ship inside the package: the frozen toy samples and the offline photo.

They live in the repository's top-level ``toy_data/`` folder, which ``pyproject.toml`` installs as
the subpackage ``ddim_edu.toy_data`` (a ``package-dir`` mapping, with the files declared as package
data). They are found through :mod:`importlib.resources` rather than by walking up from
``__file__``, because an installed wheel has no repository around it: the same call finds
``<repository>/toy_data/`` under an editable install and ``site-packages/ddim_edu/toy_data/`` under
a wheel.
"""
from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

__all__ = ["DATA_PACKAGE", "package_file"]

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

#: The package that holds the data files (the repository's ``toy_data/`` folder).
DATA_PACKAGE = "ddim_edu.toy_data"


def package_file(name: str) -> Traversable:
    """The data file ``name`` of :data:`DATA_PACKAGE`, i.e. ``toy_data/<name>``; it may not exist.

    The result is a :class:`pathlib.Path` for every install pip makes (editable or wheel); callers
    use only what every importlib.resources location offers (``is_file``, ``read_text``, ``open``).
    Raises ValueError for a name with a folder in it, and FileNotFoundError if the data package is
    not importable, which happens when ``ddim_edu`` is imported from a checkout that was never
    installed.
    """
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"name must be the name of a file in {DATA_PACKAGE} (toy_data/), without folders, got {name!r}")
    try:
        folder = resources.files(DATA_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"the data package {DATA_PACKAGE} (the repository's toy_data/ folder) cannot be imported: ddim_edu was "
            "imported from a checkout that is not installed. Install it with `pip install -e .` from the repository root"
        ) from None
    return folder / name
