"""Evaluation: distances between point clouds, the Fréchet Inception Distance for images, distances
between sets of digits in a digits classifier's features, round trips through DDIM's encoder, and a family of
exact mixtures for judging ODE solvers."""

__all__ = ["digits", "fid", "inversion", "metrics", "mixture_family"]
