"""Gaussian-mixture data, whose noised marginals and exact ε are known in closed form.

If x_0 ~ Σ_k w_k N(μ_k, diag(s_k²)), then by Eq 4 x_t ~ Σ_k w_k N(sqrt(ᾱ) μ_k, diag(ᾱ s_k² + 1 - ᾱ)):
again a mixture. Its score gives the exact (Bayes-optimal) noise prediction
``ε*(x_t) = E[ε | x_t] = -sqrt(1-ᾱ) ∇ log p_t(x_t)``, the ε that a perfectly trained network
would output, so samplers and ODE solvers can be checked with no training at all.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """Σ_k w_k N(μ_k, diag(s_k²)) in d dimensions; parameters kept in float64.

    ``means`` is [K, d]; ``stds`` is [K] (isotropic components) or [K, d]; ``weights`` [K]
    (normalised here; uniform by default).
    """

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(self.means.shape)}")
        K, d = self.means.shape
        if K == 0 or d == 0:
            raise ValueError(f"a mixture needs at least one component of dimension >= 1, got means of shape {(K, d)}")
        if not bool(torch.isfinite(self.means).all()):
            raise ValueError("means must be finite (no NaN or inf)")
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim <= 1:
            stds = stds.reshape(-1, 1).expand(K, d) if stds.numel() in (1, K) else stds
        if stds.shape != (K, d) or not bool(((stds > 0) & torch.isfinite(stds)).all()):
            raise ValueError(f"stds must be positive and finite with shape [K] or [K, d] = [{K}, {d}], got {tuple(stds.shape)}")
        self.stds = stds.clone()
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (K,) or not bool(((w > 0) & torch.isfinite(w)).all()):
            raise ValueError(f"weights must be positive and finite with shape [K] = [{K}], got {tuple(w.shape)}")
        self.weights = w / w.sum()

    @classmethod
    def ring(cls, K: int = 8, radius: float = 1.0, std: float = 0.05) -> "GaussianMixture":
        """K equal-weight isotropic Gaussians with means evenly spaced on a circle in 2-D."""
        angle = torch.arange(K, dtype=torch.float64) * (2 * math.pi / K)
        return cls(radius * torch.stack([angle.cos(), angle.sin()], dim=1), torch.full((K,), std))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, *, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
        """n draws of x_0, [n, d]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k] * z).to(dtype)

    def second_moment(self) -> Tensor:
        """E‖x_0‖², used by closed forms such as Theorem 1's constant."""
        return (self.weights * ((self.means**2).sum(1) + (self.stds**2).sum(1))).sum()

    def _components(self, x: Tensor, alpha) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component (log w_k + log N(x; m_k, v_k)) [B, K], means [B?, K, d] and variances of x_t."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x.device)
        a = alpha.reshape(-1, 1, 1) if alpha.ndim == 1 else alpha  # [B, 1, 1] or scalar
        means = (a.sqrt() * self.means.to(x.device)).to(x.dtype)
        var = (a * self.stds.to(x.device) ** 2 + 1 - a).to(x.dtype)
        diff = x.reshape(x.shape[0], 1, -1) - means
        log_n = -0.5 * ((diff**2 / var) + torch.log(2 * math.pi * var)).sum(-1)
        return log_n + self.weights.to(x.device, x.dtype).log(), diff, var

    def log_prob(self, x: Tensor, alpha=1.0) -> Tensor:
        """log p_t(x) of the noised marginal at ᾱ = alpha (alpha = 1 is the data density), [B]."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}], got {tuple(x.shape)}")
        return torch.logsumexp(self._components(x, alpha)[0], dim=1)

    def score(self, x: Tensor, alpha) -> Tensor:
        """∇_x log p_t(x) at ᾱ = alpha (a scalar or [B]), shaped like x."""
        log_joint, diff, var = self._components(x, alpha)
        resp = torch.softmax(log_joint, dim=1).unsqueeze(-1)  # [B, K, 1] posterior over components
        return (-(resp * diff / var).sum(1)).reshape(x.shape)

    def eps(self, x: Tensor, alpha) -> Tensor:
        """The exact ε*(x_t) = E[ε | x_t] = -sqrt(1-ᾱ) ∇ log p_t(x_t)."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x.device)
        scale = (1 - alpha).sqrt().to(x.dtype)
        return -(scale.reshape(-1, *([1] * (x.ndim - 1))) if scale.ndim == 1 else scale) * self.score(x, alpha)

    def probability_flow(self):
        """Eq 14 with the exact ε as the field, ``f(σ, x̄) = ε(x̄ / sqrt(1+σ²), ᾱ = 1/(1+σ²))``.

        In torchdiffeq's ``func(t, y)`` shape, like :func:`ddim_edu.ode.probability_flow`, but defined
        down to σ = 0 (the data), where a model is not: solving it to σ = 0 gives the exact x_0 a
        sampler approximates. ``f.nfe`` counts its evaluations.
        """

        def f(sigma: Tensor, x_bar: Tensor) -> Tensor:
            f.nfe += 1
            return self.eps(x_bar / torch.sqrt(1 + sigma**2), 1 / (1 + sigma**2))

        f.nfe = 0
        return f

    def eps_model(self, schedule: Schedule):
        """The exact ε as a model ``model(x, t)`` in the library's contract (t: timestep indices [B])."""

        def model(x: Tensor, t: Tensor) -> Tensor:
            t = t.to(torch.float64)
            if len(t) == 0:
                return torch.zeros_like(x)
            if bool((t == t[0]).all()):  # one noise level for the batch (a sampler's step): scalar ᾱ is cheaper
                t = t[0]
            return self.eps(x, schedule.alpha_bar(t).to(x.device))

        return model
