"""ddim-edu: DDIM (Song, Meng & Ermon 2021) and its ODE/SDE view, one equation per function."""

__version__ = "0.1.0"
