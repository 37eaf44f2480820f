"""The quadrature adjoint (SciMLSensitivity's ``QuadratureAdjoint``/``GaussAdjoint``)."""

from __future__ import annotations

import bisect

import torch

from ._backward_setup import backward_setup, merge_stats, run_backward
from ._base import AbstractContinuousAdjoint
from ._passes import backward_intervals, forward_checkpointed, forward_dense
from ._quadrature_rules import gauss_kronrod15, gauss_legendre
from ._validation import check_checkpointing
from ._vjp import VJP, flat_cat

__all__ = ["QuadratureAdjoint"]

_RULES = ("gauss-legendre", "gauss-kronrod")


class QuadratureAdjoint(AbstractContinuousAdjoint):
    """Adjoint by quadrature: only ``a`` is integrated backwards, over the stored forward dense
    output.

    The parameter gradient ``dL/dθ = ∫ aᵀ ∂f/∂θ dt`` is then a quadrature over every backward
    step: ``quadrature="gauss-legendre"`` uses ``n_nodes`` Gauss–Legendre nodes per step (default
    ⌈(order+1)/2⌉ of the backward solver, exact to degree 2n−1, one VJP call per step);
    ``"gauss-kronrod"`` uses the 7–15 Gauss–Kronrod pair per step and bisects a step whose
    embedded error exceeds the backward tolerance. The backward ODE has the state's size only,
    which makes it cheap when there are many parameters. Every backward step is split at the
    forward steps' boundaries (where the dense forward state is only continuous) before the rule
    is applied. By default the forward pass keeps its dense output (state-sized storage per step,
    no autograd graph); ``checkpointing=True`` keeps only checkpoints (output times plus
    ``n_checkpoints`` evenly spaced) and re-solves one interval at a time in the backward pass, as
    :class:`InterpolatingAdjoint` does (memory flat in the number of steps, one extra forward
    solve). ``solver``, ``rtol``, ``atol`` of the backward pass default to the forward ones. Counts
    ``nfe_adjoint``, ``nfe_quadrature``,
    ``nfe_recompute`` (checkpointing), ``naccept_adjoint``, ``nreject_adjoint``. First derivatives
    only.
    (SciMLSensitivity: ``QuadratureAdjoint``, ``GaussAdjoint``, ``GaussKronrodAdjoint``.)
    """

    name = "QuadratureAdjoint"
    keeps_dense = True

    def __init__(
        self,
        quadrature: str = "gauss-legendre",
        solver=None,
        rtol=None,
        atol=None,
        n_nodes=None,
        checkpointing: bool = False,
        n_checkpoints=None,
    ):
        if quadrature not in _RULES:
            raise ValueError(
                f"QuadratureAdjoint(quadrature=...): unknown rule {quadrature!r}; use one of "
                f"{', '.join(_RULES)}"
            )
        if n_nodes is not None:
            if not isinstance(n_nodes, int) or isinstance(n_nodes, bool) or n_nodes < 1:
                raise ValueError(
                    "QuadratureAdjoint(n_nodes=...): expected a positive int or None, got "
                    f"{n_nodes!r}"
                )
            if quadrature != "gauss-legendre":
                raise ValueError(
                    "QuadratureAdjoint: n_nodes applies to quadrature='gauss-legendre' only "
                    "(Gauss–Kronrod uses 7–15 nodes)"
                )
        check_checkpointing("QuadratureAdjoint", checkpointing, n_checkpoints)
        super().__init__(solver, rtol, atol)
        self.quadrature = quadrature
        self.n_nodes = n_nodes
        self.checkpointing = checkpointing
        self.n_checkpoints = n_checkpoints
        if checkpointing:
            self.keeps_dense = False  # the point of checkpointing: no dense output kept by default

    # -- forward: the plain loop without a graph, keeping the dense output or checkpoints ----------
    def _forward(self, problem, y0, solver, opts, stats):
        if self.checkpointing:
            return forward_checkpointed(problem, y0, solver, opts, stats, self.n_checkpoints)
        return forward_dense(problem, y0, solver, opts, stats)

    # -- backward ----------------------------------------------------------------------------------
    def _backward(self, p, ys, grad_ys, m):
        problem, targets = p.problem, p.targets
        shape = ys.shape[1:]
        ng = targets.n
        bsolver, bopts = backward_setup(self, p.solver, p.opts, ys, 1, [], dense=ng > 0)
        vjp = VJP(problem, targets)
        bstats: dict = {}
        lookup = None  # the forward state on the current interval (set below)

        def adj_rhs(t, a):
            bstats["nfe_adjoint"] = bstats.get("nfe_adjoint", 0) + 1
            _, vy, _ = vjp(t, lookup(t), a.view(shape), with_params=False)
            return vy.reshape(-1)

        if self.quadrature == "gauss-legendre":
            n = self.n_nodes or max(2, -(-(bsolver.order + 1) // 2))
            rule = gauss_legendre(n)
        else:
            rule = gauss_kronrod15()
        rtol = (
            float(bopts.rtol.min()) if isinstance(bopts.rtol, torch.Tensor) else float(bopts.rtol)
        )
        atol = (
            float(bopts.atol.min()) if isinstance(bopts.atol, torch.Tensor) else float(bopts.atol)
        )

        # Forward step boundaries: y(t) is smooth only inside a forward step, so every backward step
        # is
        # split there and the rule is applied on each piece (exact to the rule's degree on both
        # dense outputs).
        bounds: list = []

        def pieces(seg):
            lo_t, hi_t = sorted((seg.t0, seg.t0 + seg.dt))
            inner = bounds[bisect.bisect_right(bounds, lo_t) : bisect.bisect_left(bounds, hi_t)]
            th = sorted((x - seg.t0) / seg.dt for x in inner)
            pts = [0.0] + [x for x in th if 1e-12 < x < 1.0 - 1e-12] + [1.0]
            return list(zip(pts[:-1], pts[1:]))

        def integrand_sums(seg, ranges, weight_sets):
            """Σ_q w_q ⟨a(t_q), f(t_q, y(t_q))⟩ over θ-ranges of ``seg`` for each weight set (one
            graph)."""
            sums = [0.0] * len(weight_sets)
            with torch.enable_grad():
                for lo, hi in ranges:
                    for q, th in enumerate(rule[0]):
                        theta = lo + (hi - lo) * th
                        t = seg.t0 + theta * seg.dt
                        a_q = seg.evaluate(theta).view(shape)
                        f_q = problem.call(problem.time(t), lookup(t), vjp.args)
                        d = torch.vdot(f_q.reshape(-1), a_q.reshape(-1))
                        for s, w in enumerate(weight_sets):
                            if w[q] != 0.0:
                                sums[s] = sums[s] + (hi - lo) * w[q] * d
            bstats["nfe_quadrature"] = bstats.get("nfe_quadrature", 0) + len(rule[0]) * len(ranges)
            return sums

        def grads_of(total, retain=False):
            if not (isinstance(total, torch.Tensor) and total.requires_grad):
                return ys.new_zeros(ng)  # f does not depend on any target
            gs = torch.autograd.grad(
                total,
                vjp.param_inputs,
                allow_unused=True,
                materialize_grads=True,
                retain_graph=retain,
            )
            return flat_cat(gs)

        def quad_gl(seg):
            (s,) = integrand_sums(seg, pieces(seg), [rule[1]])
            return grads_of(s) * (-seg.dt)

        def quad_gk_range(seg, lo, hi, depth):
            sk, sg = integrand_sums(seg, [(lo, hi)], [rule[1], rule[2]])
            gk = grads_of(sk, retain=True)
            gg = grads_of(sg)
            err = float(torch.linalg.vector_norm(gk - gg)) * abs(seg.dt)
            tol = atol * abs(hi - lo) + rtol * float(torch.linalg.vector_norm(gk)) * abs(seg.dt)
            if err > tol and depth < 6:
                mid = 0.5 * (lo + hi)
                return quad_gk_range(seg, lo, mid, depth + 1) + quad_gk_range(
                    seg, mid, hi, depth + 1
                )
            return gk * (-seg.dt)

        def quad_gk(seg):
            return sum(quad_gk_range(seg, lo, hi, 0) for lo, hi in pieces(seg))

        quad = quad_gl if self.quadrature == "gauss-legendre" else quad_gk
        a = grad_ys[m].reshape(-1).clone()
        g = ys.new_zeros(ng)
        try:
            for t_hi, t_lo, lookup, out_lo, h_first in backward_intervals(p, m, bstats, self.name):
                fsegs = lookup.segments
                bounds[:] = sorted([s_.t0 for s_ in fsegs] + [fsegs[-1].t0 + fsegs[-1].dt])
                res = run_backward(
                    adj_rhs, a, t_hi, t_lo, bsolver, bopts, bstats, self.name, first_step=h_first
                )
                if ng:
                    for seg in res.segments:
                        g += quad(seg).to(g.dtype)
                a = res.y_final if out_lo is None else res.y_final + grad_ys[out_lo].reshape(-1)
                del res, fsegs
                lookup = None
        finally:
            merge_stats(p.stats, bstats)
        return a.view(shape), (g if ng else None)
