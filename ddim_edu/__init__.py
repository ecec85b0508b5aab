"""ddim-edu: DDIM (Song, Meng & Ermon 2021) and its ODE/SDE view, one equation per function.

The names most work starts from; everything else lives in its module (``ddim_edu.solvers``,
``ddim_edu.schedules``, …), and the toy and image legs in ``ddim_edu.toy`` and ``ddim_edu.image``.
"""
from .mixture import GaussianMixture
from .model import EpsField, denoiser_field
from .schedules import Schedule, cosine_schedule, karras_sigmas, linear_schedule
from .solvers import METHODS, encode, integrate, sample

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "EpsField",
    "GaussianMixture",
    "Schedule",
    "cosine_schedule",
    "denoiser_field",
    "encode",
    "integrate",
    "karras_sigmas",
    "linear_schedule",
    "sample",
]
