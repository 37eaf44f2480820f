"""Record stats and final states of every stiff solver on Robertson / VdP (host and torch paths)."""

import json
import sys

import numpy as np
import scipy.sparse as sp
import torch

import pyneuralode as pn

torch.set_num_threads(1)
sys.path.insert(0, "/work/wt-18/benchmarks")
from stiff_large import torch_rhs as bruss_rhs  # noqa: E402 - needs the sys.path set-up above


def rober(t, y):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack(
        [-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2, 3e7 * y2 * y2], -1
    )


def vdp(t, y):
    mu = 1000.0
    return torch.stack([y[..., 1], mu * ((1 - y[..., 0] ** 2) * y[..., 1]) - y[..., 0]], -1)


def vdp_t(t, y):  # non-autonomous
    return vdp(t, y) + torch.stack(
        [0 * y[..., 0] + 0.01 * torch.sin(torch.as_tensor(t)), 0 * y[..., 1]], -1
    )


out = {}
names = [
    "Rodas5P",
    "Rodas4",
    "Rosenbrock23",
    "KenCarp4",
    "Kvaerno5",
    "Kvaerno3",
    "TRBDF2",
    "ImplicitEuler",
    "QNDF",
]
probs = {
    "rober": (rober, [1.0, 0.0, 0.0], 1e2),
    "vdp": (vdp, [2.0, 0.0], 100.0),
    "vdpt": (vdp_t, [2.0, 0.0], 20.0),
}
for nm in names:
    for pname, (f, y0l, T) in probs.items():
        for mode in ("nograd", "grad", "f32") if pname != "vdpt" else ("nograd",):
            if mode == "fd" and nm == "Rosenbrock23":
                pass
            dt = torch.float32 if mode == "f32" else torch.float64
            y0 = torch.tensor(y0l, dtype=dt)
            if mode == "2d":
                y0 = y0.view(1, -1)
            S = getattr(pn, nm)
            solver = S(jac_mode="finite_difference") if mode == "fd" else S()
            t = torch.tensor([0.0, T], dtype=dt)
            rtol = 1e-4 if mode == "f32" else 1e-6
            ctx = torch.enable_grad() if mode == "grad" else torch.no_grad()
            with ctx:
                yy = y0.clone().requires_grad_(mode == "grad")
                try:
                    sol = pn.solve(f, yy, t, solver, rtol=rtol, atol=rtol * 1e-3, max_steps=10**6)
                    st = {k: v for k, v in sol.stats.items() if isinstance(v, (int, float))}
                    out[f"{nm}/{pname}/{mode}"] = dict(
                        stats=st, y=sol.ys[-1].detach().reshape(-1).tolist()
                    )
                except Exception as e:
                    out[f"{nm}/{pname}/{mode}"] = dict(err=repr(e)[:200])
# sparse / gmres / batched on the small Brusselator
N = 20
fb = bruss_rhs(N)
P = sp.lil_matrix((2 * N, 2 * N))
for i in range(N):
    for j in (i - 1, i, i + 1):
        if 0 <= j < N:
            P[i, j] = P[N + i, N + j] = 1
    P[i, N + i] = P[N + i, i] = 1
x = torch.arange(1, N + 1, dtype=torch.float64) / (N + 1)
yb = torch.cat([1 + torch.sin(2 * np.pi * x), torch.full((N,), 3.0, dtype=torch.float64)])
for nm in ["Rodas5P", "KenCarp4", "QNDF"]:
    for lin in ("lu", "sparse", "gmres"):
        for mode in ("nograd", "grad") if lin == "sparse" else ("nograd",):
            if lin == "gmres" and nm == "Rodas5P" and mode == "grad":
                continue
            S = getattr(pn, nm)
            kw = dict(linsolve=lin.split("-")[0])
            if lin.startswith("sparse"):
                kw["jac_sparsity"] = P
            if lin == "sparse-fd":
                kw["jac_mode"] = "finite_difference"
            if nm == "Rodas5P" and lin.startswith("sparse"):
                kw["differentiable_jac"] = False
            ctx = torch.enable_grad() if mode == "grad" else torch.no_grad()
            with ctx:
                try:
                    sol = pn.solve(
                        fb,
                        yb.clone().requires_grad_(mode == "grad"),
                        torch.tensor([0.0, 1.0], dtype=torch.float64),
                        S(**kw),
                        rtol=1e-5,
                        atol=1e-7,
                    )
                    st = {k: v for k, v in sol.stats.items() if isinstance(v, (int, float))}
                    out[f"{nm}/bruss/{lin}/{mode}"] = dict(
                        stats=st, y=sol.ys[-1].detach().reshape(-1).tolist()
                    )
                except Exception as e:
                    out[f"{nm}/bruss/{lin}/{mode}"] = dict(err=repr(e)[:200])
# batched
yB = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=torch.float64)
for nm in ["Rodas5P", "KenCarp4", "QNDF"]:
    for mode in ("nograd", "grad"):
        ctx = torch.enable_grad() if mode == "grad" else torch.no_grad()
        with ctx:
            sol = pn.solve(
                vdp,
                yB.clone().requires_grad_(mode == "grad"),
                torch.tensor([0.0, 50.0], dtype=torch.float64),
                getattr(pn, nm)(batched=True),
                rtol=1e-6,
                atol=1e-9,
            )
            st = {k: v for k, v in sol.stats.items() if isinstance(v, (int, float))}
            out[f"{nm}/vdpB/{mode}"] = dict(stats=st, y=sol.ys[-1].detach().reshape(-1).tolist())
json.dump(out, open(sys.argv[1], "w"), indent=0)
print(len(out), sum("err" in v for v in out.values()))
