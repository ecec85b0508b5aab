"""Evaluation: distances between point clouds, the Fréchet Inception Distance for images, and distances
between sets of digits in a digits classifier's features."""

__all__ = ["digits", "fid", "metrics"]
