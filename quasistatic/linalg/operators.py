"""Curvature operators on θ: Hessian-vector products of J and generalized Gauss–Newton products.

A = ∇²θJ(θ; λ, γ, t) is the matrix of Lemma 5 (eq. 17) whose solves give the equilibrium tangents
(eq. 18). It is never formed: :class:`CurvatureOperator` applies (A + μI) to a block of vectors V
(N, k) with ``torch.func`` (Pearlmutter 1994), vmapped over the k columns, in one of two modes:

- ``"reverse"`` (default): reverse-over-reverse. The pullback of ∇θJ at θ is built once per
  operator (about one gradient) and kept; A being symmetric, pulling v back through it gives Av.
  Each product then costs about one gradient (benchmarks/README.md) — the operator is applied
  hundreds of times in a Krylov solve at the same θ, so the one-off cost and the kept graph of
  ∇θJ pay for themselves.
- ``"forward"``: forward-over-reverse ``jvp(grad J)``. Nothing is kept between calls (lower memory,
  for large models), but each call redoes the forward and backward passes; the k columns of a
  block share them, so a block of 3 costs about 0.6 × three single products.

The generalized Gauss–Newton matrix G = Σ Jₒᵀ ∇²ℓ Jₒ linearizes the network outputs o(θ) (encoder
mean and log-variance, decoder parameters, classifier logits) and keeps the curvature of the losses
ℓ in the outputs: KL to N(0, I), Bernoulli/Gaussian log-likelihood and cross-entropy are convex in
them, so G ⪰ 0 by construction, whatever θ.

The matrices are registered by name in :data:`OPERATORS` (``"hessian"``, ``"ggn"``): a factory
``(objective, theta, controls, mode) -> products`` returns the undamped block products V ↦ A V,
(N, k) → (N, k), and counts the passes they share on ``objective.work``; the
:class:`CurvatureOperator` around them adds the damping and counts the products.

The products are taken of each chunk's share of R + λD + γC (``objective.local_values``), added in
order and, on a data-parallel objective (``objective.group``), summed over the ranks by
``objective.sum_chunks`` (one all-reduce per application, whatever the number of columns k); then
σS's Hessian σI is added. A product is linear in the shares, so summing it is exact; a collective
inside the ``torch.func`` transforms would instead need rules for every transform and order (see
:func:`quasistatic.distributed.summed_over_ranks`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, hessian, jvp, vjp, vmap

from ..data.mixture import mixture_weights
from ..errors import InputError, bad_value, choice_error
from ..thermo.objective import Controls, Objective
from ..registry import Registry
from .krylov import Matvec

__all__ = ["CurvatureOperator", "OPERATORS", "MODES", "hessian_products", "ggn_products", "dense_hessian"]

MODES = ("reverse", "forward")


class CurvatureOperator:
    """V ↦ (A + μI)V with A = ∇²θJ (``kind="hessian"``), the Gauss–Newton G (``kind="ggn"``) or
    another matrix registered in :data:`OPERATORS`, at a fixed point θ and controls (λ, γ, t). V is
    (N,) or (N, k); the result has its shape.

    Every application counts k Hessian-vector products on ``objective.work``; the "reverse"
    mode's one-off pullback counts one gradient, and the "forward" mode's shared forward and
    backward passes count one gradient per call.
    """

    def __init__(
        self,
        objective: Objective,
        theta: Tensor,
        controls: Controls,
        kind: str = "hessian",
        damping: float = 0.0,
        mode: str = "reverse",
    ) -> None:
        OPERATORS.get(kind)  # an unknown name raises, listing the registered ones
        if mode not in MODES:
            raise choice_error("Hessian-vector product mode", MODES, mode)
        if not damping >= 0:
            raise bad_value("damping", "a number >= 0", damping)
        self.objective = objective
        self.theta = theta.detach()
        self.controls = controls
        self.kind = kind
        self.damping = damping
        self.mode = mode
        self._apply = OPERATORS.make(kind, objective, self.theta, controls, mode)

    @property
    def size(self) -> int:
        return self.theta.numel()

    def __call__(self, v: Tensor) -> Tensor:
        block = v.unsqueeze(-1) if v.dim() == 1 else v
        self.objective.work.hvps += block.shape[1]
        out = self._apply(block)
        if self.damping:
            out = out + self.damping * block
        return out.squeeze(-1) if v.dim() == 1 else out

    def dense(self) -> Tensor:
        """The (N, N) matrix, assembled column by column; for small models and tests."""
        return self(torch.eye(self.size, dtype=self.theta.dtype, device=self.theta.device))


def hessian_products(objective: Objective, theta: Tensor, controls: Controls, mode: str) -> Matvec:
    """V ↦ A V with A = ∇²θJ: each column pulled back through ∇θJ (``mode="reverse"``: the pullback
    built at the first call and kept) or pushed forward through it (``"forward"``), vmapped over the
    columns."""
    gradients = [grad(value) for value in objective.local_values(controls)]  # one per chunk
    if mode == "forward":

        def forward_products(block: Tensor) -> Tensor:
            objective.work.gradients += 1
            products = objective.sum_chunks(
                vmap(lambda v, g=gradient: jvp(g, (theta,), (v,))[1], in_dims=1, out_dims=1)(block)
                for gradient in gradients
            )
            return products + objective.sigma * block  # σS = ½σ‖θ‖² has the Hessian σI

        return forward_products
    pullbacks: list[Callable[[Tensor], tuple[Tensor]]] = []

    def reverse_products(block: Tensor) -> Tensor:
        if not pullbacks:
            objective.work.gradients += 1
            pullbacks.extend(vjp(gradient, theta)[1] for gradient in gradients)
        products = objective.sum_chunks(
            vmap(lambda v, p=pullback: p(v)[0], in_dims=1, out_dims=1)(block) for pullback in pullbacks
        )
        return products + objective.sigma * block

    return reverse_products


def ggn_products(objective: Objective, theta: Tensor, controls: Controls, mode: str) -> Matvec:
    """V ↦ G V = Σ over parts and chunks of Jₒᵀ (∇²ℓ (Jₒ V)): jvp, then an HVP of the loss in the
    outputs, then the vjp of the outputs (whose forward pass is shared by the columns). The same
    whatever ``mode``; the prior must have a closed-form KL (the loss is then convex in the outputs)."""
    if not objective.model.prior.has_closed_form_kl:
        raise InputError(
            "curvature operator 'ggn' must be used with a prior with a closed-form KL "
            f"(normal), got prior {objective.model.config.prior!r}"
        )

    def products(block: Tensor) -> Tensor:
        objective.work.gradients += 1  # the outputs' forward pass and pullback, shared by the columns
        weights = controls.weights(theta)
        part_weights = [1.0] if not objective.is_mixture else mixture_weights(controls.t)
        total = torch.zeros_like(block)
        for part, part_weight in zip(objective.parts, part_weights):
            if part_weight == 0:
                continue
            scale = part_weight / part.total
            for start, stop in part.chunks():
                if start == stop:  # a rank's empty shard of a subsample
                    continue

                # The closures below read the loop's variables (B023) but are called within this iteration only.
                def outputs(th: Tensor, start: int = start, stop: int = stop) -> tuple[Tensor, ...]:
                    return part.outputs(th, start, stop)  # noqa: B023

                def loss(outs: tuple[Tensor, ...], start: int = start, stop: int = stop) -> Tensor:
                    return scale * (part.losses(outs, start, stop).sum(-1) @ weights)  # noqa: B023

                # torch.func.vjp is annotated as returning 2 or 3 values whatever has_aux (no overload)
                outs, pullback = vjp(outputs, theta)  # type: ignore[misc]
                loss_grad = grad(loss)

                def ggn_v(v: Tensor) -> Tensor:
                    jv = jvp(outputs, (theta,), (v,))[1]
                    h_jv = jvp(loss_grad, (outs,), (jv,))[1]  # noqa: B023
                    return pullback(h_jv)[0]  # noqa: B023

                total = total + vmap(ggn_v, in_dims=1, out_dims=1)(block)
        return objective.reduce(total) + objective.sigma * block  # σS = ½σ‖θ‖² has the Hessian σI

    return products


# factory(objective, theta, controls, mode) -> V ↦ A V (undamped); CurvatureOperator's ``kind``
OPERATORS: Registry[Matvec] = Registry("curvature operator")
OPERATORS.register("hessian", hessian_products)
OPERATORS.register("ggn", ggn_products)


def dense_hessian(objective: Objective, theta: Tensor, controls: Controls) -> Tensor:
    """∇²θJ by ``torch.func.hessian``: the exact slow reference the operators are tested against."""
    dense = objective.sum_chunks(hessian(value)(theta.detach()) for value in objective.local_values(controls))
    return dense + objective.sigma * torch.eye(len(theta), dtype=dense.dtype, device=dense.device)
