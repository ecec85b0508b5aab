"""Helpers with no mathematics in them: input checks, atomic files, derived seeds, signals, threads."""

__all__ = ["checks", "files", "package_data", "seeds", "signals", "threads"]
