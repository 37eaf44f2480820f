"""The compiled adjoint (``solve(..., compile=True)`` above the forward-sensitivity sizes) against
the native engine's ``InterpolatingAdjoint``, side by side: the gradient of a loss w.r.t. y0 and
the parameters of an MLP field (2 → H → 2, tanh; 202 parameters for H = 40), Tsit5, and of a
Robertson system with 40 parameters (log-rates ``log k0 + Cθ``), Rodas5P.

Per case: the first call's time (trace + compile, or disk-cache load), the time of one
forward + backward (process CPU time, best of ``--repeat``, the compiled and the native runs
alternating), the largest difference of the two gradients relative to the largest component, and
the compiled gradient against a central difference of tight solves in a random direction.

    python benchmarks/compiled_adjoint.py            # 5 repeats
    python benchmarks/compiled_adjoint.py --quick    # 2 repeats, MLP only

``adjoint_table(quick, repeat)`` returns the table's markdown lines (for
``benchmarks/compiled.py --only adjoint``).
"""

from __future__ import annotations

import argparse
import time

import torch

import pyneuralode as pn

F64 = dict(dtype=torch.float64)


class MLP(torch.nn.Module):
    def __init__(self, hidden=40):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)
        ).double()

    def forward(self, t, y):
        return self.net(y) - 0.5 * y


def robertson(t, y, k):
    return torch.stack(
        [
            -k[0] * y[0] + k[2] * y[1] * y[2],
            k[0] * y[0] - k[1] * y[1] ** 2 - k[2] * y[1] * y[2],
            k[1] * y[1] ** 2,
        ]
    )


class ManyRates(torch.nn.Module):
    def __init__(self, m=40):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.C = 0.05 * torch.randn(3, m, generator=gen, **F64)
        self.theta = torch.nn.Parameter(0.1 * torch.randn(m, generator=gen, **F64))
        self.k0 = torch.tensor([0.04, 3e7, 1e4], **F64)

    def forward(self, t, y):
        return robertson(t, y, self.k0 * torch.exp(self.C @ self.theta))


def _cases(quick):
    f = MLP()
    cases = [
        (
            "MLP 2→40→2 (202 parameters), Tsit5, t ∈ [0, 5], rtol 1e-8",
            f,
            torch.tensor([0.4, -0.3], **F64),
            torch.linspace(0, 5, 11, **F64),
            pn.Tsit5(),
            dict(rtol=1e-8, atol=1e-10),
        )
    ]
    if not quick:
        cases.append(
            (
                "Robertson, 40 parameters, Rodas5P, t = 0…100, rtol 1e-7",
                ManyRates(),
                torch.tensor([1.0, 0.0, 0.0], **F64),
                torch.tensor([0.0, 1.0, 10.0, 100.0], **F64),
                pn.Rodas5P(),
                dict(rtol=1e-7, atol=1e-11),
            )
        )
    return cases


def _grad(f, y0, t, solver, tol, compile):
    y0 = y0.clone().requires_grad_(True)
    wrt = (y0, *f.parameters())
    sol = pn.solve(f, y0, t, solver, sensealg=pn.InterpolatingAdjoint(), compile=compile, **tol)
    w = torch.linspace(0.5, 1.5, sol.ys.numel(), **F64).reshape(sol.ys.shape)
    g = torch.autograd.grad((sol.ys * w).sum(), wrt)
    return torch.cat([x.reshape(-1) for x in g]), w


def _loss(f, y0, t, solver, tol, w):
    with torch.no_grad():
        return float((pn.solve(f, y0, t, solver, compile=True, **tol).ys * w).sum())


def _fd_check(f, y0, t, solver, tol, g, w):
    """Relative difference of g·d and a central difference (of solves at rtol 1e-11) in a
    random direction d: the compiled gradient's accuracy at the case's tolerance."""
    params = list(f.parameters())
    d = torch.randn(g.shape[0], generator=torch.Generator().manual_seed(5), **F64)
    base = [p.detach().clone() for p in params]
    eps = 1e-5

    def shifted(s):
        with torch.no_grad():
            i = y0.numel()
            yv = y0 + s * d[:i]
            for p, b in zip(params, base):
                p.copy_(b + s * d[i : i + p.numel()].reshape(p.shape))
                i += p.numel()
            out = _loss(f, yv, t, solver, dict(rtol=1e-11, atol=1e-14), w)
            for p, b in zip(params, base):
                p.copy_(b)
        return out

    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    return abs(float(g @ d) - fd) / max(abs(fd), 1e-300)


def adjoint_table(quick=False, repeat=None):
    repeat = repeat or (2 if quick else 5)
    lines = [
        "| case | first call s | compiled ms | native ms | native/compiled | "
        "max rel. diff | vs central diff. (rtol 1e-11) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, f, y0, t, solver, tol in _cases(quick):
        t0 = time.process_time()
        g_c, w = _grad(f, y0, t, solver, tol, True)
        first = time.process_time() - t0
        best = {True: float("inf"), False: float("inf")}
        g = {}
        for _ in range(repeat):
            for compile in (True, False):
                t0 = time.process_time()
                g[compile], _ = _grad(f, y0, t, solver, tol, compile)
                best[compile] = min(best[compile], time.process_time() - t0)
        diff = float((g[True] - g[False]).abs().max() / g[False].abs().max())
        fd = _fd_check(f, y0, t, solver, tol, g_c, w)
        lines.append(
            f"| {label} | {first:.2f} | {1e3 * best[True]:.2f} | {1e3 * best[False]:.1f} | "
            f"{best[False] / best[True]:.0f}× | {diff:.1e} | {fd:.1e} |"
        )
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("\n".join(adjoint_table(a.quick, a.repeat)))


if __name__ == "__main__":
    main()
