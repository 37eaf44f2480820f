"""Why diffrax's Kvaerno5 takes 3-7x the steps of pyneuralode's Kvaerno5 in
benchmarks/compiled.py --only wp: its defaults (I-controller, Newton tolerance = the step
controller's rtol/atol) reject about half the steps. Accepted/rejected steps and the error at the
end for the defaults, a PI controller, and a looser root finder (session 4 of issue 19).

    nice -n 10 python notes/issue-19-diffrax-kvaerno5.py
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import diffrax as dfx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from make_stiff_references import hires, robertson  # noqa: E402

jax.config.update("jax_enable_x64", True)
refs = json.loads((ROOT / "tests/data/stiff_references.json").read_text())["ivp_testset"]
for name, f, asc in [("hires", hires, 1e-4), ("rober", robertson, 1e-10)]:
    r = refs[name]
    variants = [
        ("defaults", dfx.Kvaerno5(), {}),
        ("PIDController(pcoeff=0.3, icoeff=0.3)", dfx.Kvaerno5(), dict(pcoeff=0.3, icoeff=0.3)),
        (
            "root_finder=VeryChord(rtol=1e-3, atol=1e-6*atol/rtol)",
            dfx.Kvaerno5(root_finder=dfx.VeryChord(rtol=1e-3, atol=1e-6 * asc)),
            {},
        ),
    ]
    for label, solver, pid in variants:

        @jax.jit
        def solve(y0, rtol, atol, solver=solver, pid=pid, f=f, r=r):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(lambda t, y, a: jnp.stack(f(t, y))),
                solver,
                0.0,
                r["t_end"],
                None,
                y0,
                stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol, **pid),
                saveat=dfx.SaveAt(t1=True),
                max_steps=10**6,
                throw=False,
            )
            return sol.ys, sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"]

        for rtol in [1e-4, 1e-6]:
            ys, na, nr = solve(jnp.array(r["y0"]), rtol, rtol * asc)
            e = np.max(np.abs(np.asarray(ys[-1]) - r["y_end"]) / np.abs(r["y_end"]))
            print(
                f"{name} {label} rtol={rtol:g}: accepted {int(na)}, rejected {int(nr)}, "
                f"error {e:.1e}"
            )
