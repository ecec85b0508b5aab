"""Helpers with no mathematics in them: input checks, atomic files, derived seeds, signals."""

__all__ = ["checks", "files", "package_data", "seeds", "signals"]
