"""The toy leg: two-dimensional data sets and a small ε-MLP, where every sampler can be seen at work."""

__all__ = ["datasets", "nets"]
