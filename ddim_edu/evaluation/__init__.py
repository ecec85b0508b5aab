"""Evaluation: distances between point clouds and the Fréchet Inception Distance for images."""

__all__ = ["fid", "metrics"]
