"""Rosenbrock steps for 1–3-component states in straight-line Python float code.

For a state of one to three components on the CPU without autograd, the per-step cost of a
Rosenbrock method is Python's dispatch overhead rather than arithmetic: numpy spends about 5 µs a
stage on four tiny array calls, where the same stage written out as scalar float expressions takes
about 2 µs. This module writes that code once per (tableau, state size, ∂f/∂t term, state shape):
every stage as explicit expressions with the tableau's coefficients as literals (zeros left out),
compiled with :func:`compile` and cached. The generated source is kept on the kernel
(``kernel.source``) for inspection.

The kernel computes exactly what :meth:`GenericRosenbrock.step` computes (the transformed form of
Hairer & Wanner IV.7, eq. 7.25)::

    U_i = M (f(t0 + c_i h, y0 + Σ_j A_ij U_j) + Σ_j C_ij U_j / h + h d_i ∂f/∂t),   M = (I/(hγ) − J)⁻¹
    y1 = y0 + Σ_j m_j U_j,   error = Σ_j e_j U_j,   dense rows k_r = Σ_j H_rj U_j

in float64 Python arithmetic (IEEE double, as numpy and torch on the CPU). Overflow gives inf and
invalid operations NaN without raising; both reach the error norm and reject the step.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

#: states up to this many components take the unrolled kernel (the closed-form inverse covers 1–3)
MAX_COMPONENTS = 3

_KERNELS: Dict[Tuple, Callable] = {}


def _terms(pairs) -> str:
    """``"c1*x1 + c2*x2"`` from (coefficient, name) pairs, leaving out zero coefficients ("0.0" if none)."""
    out = [f"{float(c)!r}*{x}" for c, x in pairs if float(c) != 0.0]
    return " + ".join(out) if out else "0.0"


def generate_source(tab, n: int, with_dt: bool, flat: bool) -> str:
    """Python source of ``kernel(rhs, t0, h, y, f0, dT, M, as_tensor, shape) -> tuple of floats``.

    ``y``, ``f0``, ``dT`` are sequences of ``n`` floats (``dT`` unused unless ``with_dt``), ``M``
    the n×n nested list ``(I/(hγ) − J)⁻¹``, ``as_tensor(tuple) -> tensor`` makes f's argument
    (viewed as ``shape`` unless ``flat``). The result holds ``y1``, the error estimate and the
    dense-output rows, ``n`` floats each.
    """
    s = tab.stages
    K = range(n)
    L = ["def kernel(rhs, t0, h, y, f0, dT, M, as_tensor, shape):"]
    L.append("    inv_h = 1.0 / h")
    L += [f"    y0_{k} = y[{k}]" for k in K]
    L += [f"    m{r}{c} = M[{r}][{c}]" for r in K for c in K]
    if with_dt:
        L += [f"    dT{k} = dT[{k}]" for k in K]
    for i in range(s):
        hd = float(tab.d[i]) if with_dt else 0.0
        if i == 0:
            L += [f"    r{k} = f0[{k}]" for k in K]
        else:
            u = ", ".join(f"y0_{k} + {_terms((tab.A[i, j], f'U{j}_{k}') for j in range(i))}" for k in K)
            arg = f"as_tensor(({u},))" if flat else f"as_tensor(({u},)).view(shape)"
            call = f"rhs(t0 + {float(tab.c[i])!r}*h, {arg})"
            L.append(f"    F = {call}.tolist()" if flat else f"    F = {call}.reshape(-1).tolist()")
            for k in K:
                cterm = _terms((tab.C[i, j], f"U{j}_{k}") for j in range(i))
                L.append(f"    r{k} = F[{k}]" + (f" + ({cterm})*inv_h" if cterm != "0.0" else ""))
        if hd != 0.0:
            L += [f"    r{k} += ({hd!r}*h)*dT{k}" for k in K]
        for k in K:
            L.append(f"    U{i}_{k} = " + " + ".join(f"m{k}{c}*r{c}" for c in K))
    rows = [[(tab.m[j], f"U{j}_{k}") for j in range(s)] for k in K]
    outs = [f"y0_{k} + {_terms(rows[k])}" for k in K]
    outs += [_terms((tab.e[j], f"U{j}_{k}") for j in range(s)) for k in K]
    if tab.H is not None:
        for hr in tab.H:
            outs += [_terms((hr[j], f"U{j}_{k}") for j in range(s)) for k in K]
    L.append("    return (" + ", ".join(outs) + ",)")
    return "\n".join(L) + "\n"


def unrolled_kernel(tab, n: int, with_dt: bool, flat: bool, label: str = "Rosenbrock") -> Callable:
    """The compiled kernel of :func:`generate_source`, built once per (tableau, n, with_dt, flat);
    ``label`` (the method's name) names it in tracebacks and profiles."""
    key = (id(tab), n, with_dt, flat)
    kern = _KERNELS.get(key)
    if kern is None:
        src = generate_source(tab, n, with_dt, flat)
        ns: dict = {}
        exec(compile(src, f"<pyneuralode {label} kernel, n={n}>", "exec"), ns)
        kern = ns["kernel"]
        kern.source = src
        kern.tab = tab  # keeps id(tab) valid for the cache key
        _KERNELS[key] = kern
    return kern
