"""``python -m ddim_edu``: the command line of :mod:`ddim_edu.cli` (``sample``, ``fid``)."""
from .cli import main

__all__: list[str] = []

raise SystemExit(main())
