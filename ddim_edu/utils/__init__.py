"""Helpers with no mathematics in them: input checks, atomic files, derived seeds, signals."""
