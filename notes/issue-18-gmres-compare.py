"""Before/after comparison of the GMRES merge (issue 18, session 3): the steady-state adjoint's
gradients and iteration counts, and the stiff solvers' linsolve="gmres" statistics and results.
Run once per tree, `PYTHONPATH=<tree> python notes/issue-18-gmres-compare.py > out.json`, then
compare the two JSON files (notes/issue-18-gmres-compare.py --cmp before.json after.json)."""

import json
import sys

import torch

torch.set_num_threads(1)


def run():
    import pyneuralode as pn

    out = {}
    for dtype in (torch.float64, torch.float32):
        for B, restart in ((1, 50), (8, 50), (8, 5)):
            g = torch.Generator().manual_seed(0)
            n = 24
            W = (0.9 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5).to(dtype)
            W.requires_grad_(True)
            x = torch.randn(B, n, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
            f = lambda z, x, W=W: torch.tanh(z @ W.T + x)
            z = pn.steady_state(
                f,
                torch.zeros(B, n, dtype=dtype),
                (x,),
                pn.Anderson(m=5, max_iters=200),
                abstol=1e-10 if dtype == torch.float64 else 1e-6,
                reltol=0,
                sensealg=pn.SteadyStateAdjoint("gmres", restart=restart),
                batch_dim=0,
            )
            (z * torch.linspace(-1, 1, n, dtype=dtype)).sum().backward()
            st = pn.last_stats
            out[f"steady/{str(dtype)[6:]}/B{B}/restart{restart}"] = dict(
                gW=W.grad.double().flatten().tolist(),
                gx=x.grad.double().flatten().tolist(),
                bwd_iterations=st.bwd_iterations,
                bwd_residual=float(st.bwd_residual),
                retcode=str(st.bwd_retcode),
            )
    g = torch.Generator().manual_seed(1)
    n = 12
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    M = Q @ torch.diag(-torch.logspace(0, 3, n, dtype=torch.float64)) @ Q.T
    y0 = torch.randn(n, generator=g, dtype=torch.float64)
    for S in ("Rodas5P", "KenCarp4", "QNDF"):
        with torch.no_grad():
            sol = pn.solve(
                lambda t, y: M @ y + 0.1 * torch.sin(y),
                y0,
                [0.0, 0.1, 1.0],
                getattr(pn, S)(linsolve="gmres"),
                rtol=1e-7,
                atol=1e-10,
            )
        out[f"stiff/{S}"] = dict(stats=dict(sol.stats), y=sol.ys.flatten().tolist())
    th = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    sol = pn.solve(
        lambda t, y: th * (M @ y) + 0.1 * torch.sin(y),
        y0,
        [0.0, 0.1],
        pn.Rodas5P(linsolve="gmres"),
        rtol=1e-7,
        atol=1e-10,
        sensealg=pn.DirectAdjoint(),
    )
    (gth,) = torch.autograd.grad(sol.ys[-1].sum(), th)
    out["stiff/Rodas5P-DirectAdjoint-grad"] = dict(stats=dict(sol.stats), g=float(gth))
    return out


def cmp(a, b):
    A, Bj = json.load(open(a)), json.load(open(b))
    for k in A:
        x, y = A[k], Bj[k]
        if k.startswith("steady"):

            def rel(p, q):
                num = max(abs(u - v) for u, v in zip(p, q))
                return num / max(max(abs(u) for u in p), 1e-300)

            print(
                f"{k:34s} iters {x['bwd_iterations']:4d} -> {y['bwd_iterations']:4d}  residual "
                f"{x['bwd_residual']:.2e} -> {y['bwd_residual']:.2e}  "
                f"{x['retcode']}->{y['retcode']}  "
                f"grad rel diff W {rel(x['gW'], y['gW']):.1e} x {rel(x['gx'], y['gx']):.1e}"
            )
        else:
            same = x["stats"] == y["stats"]
            d = (
                max(abs(u - v) for u, v in zip(x["y"], y["y"]))
                if "y" in x
                else abs(x["g"] - y["g"])
            )
            print(
                f"{k:34s} stats {'identical' if same else 'DIFFER'}  "
                f"{'' if same else (x['stats'], y['stats'])}  max |diff| {d:.1e}"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--cmp":
        cmp(sys.argv[2], sys.argv[3])
    else:
        print(json.dumps(run()))
