"""The fixed cost of a small compiled solve, two package copies side by side (issue 19, s4-19c):
Lotka–Volterra, Tsit5, 11 outputs, grad mode off; at rtol 1e-6 (92 steps), 1e-4 (39 steps), a
one-step solve (t = [0, 1e-9]: the call's own cost), and rtol 1e-6 with grad mode on (nothing
requires grad: the same plain solve after the check that no gradient can flow). Process CPU µs
per call, the best of 15 batches of 100 calls, each copy in its own process, the copies
alternating over 3 rounds.

    git -C /work/main archive HEAD | tar -x -C /tmp/old   # or any other copy
    nice -n 10 python notes/issue-19-call-overhead-ab.py /tmp/old $PWD
"""

import os
import subprocess
import sys
import time

CASES = (
    ("rtol 1e-6", 1e-6, 10.0, False),
    ("rtol 1e-4", 1e-4, 10.0, False),
    ("1 step", 1e-6, 1e-9, False),
    ("rtol 1e-6, grad mode on", 1e-6, 10.0, True),
)


def child(root):
    sys.path.insert(0, root)
    import torch

    import pyneuralode as pn

    assert pn.__file__.startswith(root), pn.__file__
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    F = dict(dtype=torch.float64)

    def lv(t, y, p):
        a, b, c, d = p[0], p[1], p[2], p[3]
        x, z = y[0], y[1]
        return torch.stack([a * x - b * x * z, -c * z + d * x * z])

    p = torch.tensor([1.5, 1.0, 3.0, 1.0], **F)
    y0 = torch.tensor([1.0, 1.0], **F)
    s = pn.Tsit5()
    out = []
    for _, rtol, t1, grad_mode in CASES:
        t = torch.linspace(0, t1, 11, **F)
        torch.set_grad_enabled(grad_mode)  # on: nothing requires grad, so still a plain solve

        def call(t=t, rtol=rtol):
            return pn.solve(lv, y0, t, s, compile=True, args=(p,), rtol=rtol, atol=rtol * 1e-3)

        sol = call()
        best = float("inf")
        for _ in range(15):
            c0 = time.process_time()
            for _ in range(100):
                call()
            best = min(best, (time.process_time() - c0) / 100)
        out.append(f"{best * 1e6:.1f}:{sol.stats['naccept']}")
    print(" ".join(out))


def main(roots):
    res = {r: [] for r in roots}
    for _ in range(3):
        for r in roots:
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
            o = subprocess.run(
                [sys.executable, __file__, "--child", r],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            ).stdout.split()
            res[r].append([(float(x.split(":")[0]), x.split(":")[1]) for x in o])
    print("| copy | " + " | ".join(f"{c[0]} (µs/call, steps)" for c in CASES) + " |")
    print("|---|" + "---|" * len(CASES))
    for r in roots:
        cells = []
        for j in range(len(CASES)):
            cells.append(f"{min(row[j][0] for row in res[r]):.1f} ({res[r][0][j][1]})")
        print(f"| {r} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main(sys.argv[1:])
