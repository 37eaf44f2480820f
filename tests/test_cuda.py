"""The native engine on CUDA tensors: same answers as on the CPU, gradients included.

Runs wherever a CUDA device is present; skips with the reason elsewhere.
"""

import pytest
import torch

import pyneuralode as pn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
    ),
]


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
        )

    def forward(self, t, y):
        return self.net(y) * torch.cos(t)


@pytest.mark.parametrize("solver", [pn.Tsit5(), pn.DP8(), pn.Rodas5P(), pn.KenCarp4(), pn.QNDF()])
@pytest.mark.parametrize(
    "sensealg", [None, pn.BacksolveAdjoint(), pn.InterpolatingAdjoint(), pn.QuadratureAdjoint()]
)
def test_cuda_matches_cpu(solver, sensealg):
    f_cpu = Field().double()
    f_gpu = Field().double().cuda()
    y0 = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    out = []
    for f, dev in ((f_cpu, "cpu"), (f_gpu, "cuda")):
        y = y0.to(dev).requires_grad_()
        sol = pn.solve(f, y, t.to(dev), solver, rtol=1e-8, atol=1e-10, sensealg=sensealg)
        assert sol.ys.device.type == dev
        sol.ys.square().sum().backward()
        out.append((sol.ys.detach().cpu(), y.grad.cpu(), [p.grad.cpu() for p in f.parameters()]))
    (ys_c, g_c, p_c), (ys_g, g_g, p_g) = out
    torch.testing.assert_close(ys_g, ys_c, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_g, g_c, rtol=1e-5, atol=1e-7)
    for a, b in zip(p_g, p_c):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_cuda_event_matches_cpu():
    out = []
    for dev in ("cpu", "cuda"):
        f = Field().double().to(dev)
        y0 = (
            torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
            .to(dev)
            .requires_grad_()
        )
        sol = pn.solve(
            f,
            y0,
            torch.tensor([0.0, 5.0], dtype=torch.float64, device=dev),
            rtol=1e-9,
            atol=1e-11,
            event=lambda t, y, y0=y0: y[:, 0].mean() - y0[:, 0].detach().mean() - 0.05,
        )
        (g,) = torch.autograd.grad(sol.event_t, y0)
        out.append((float(sol.event_t.detach()), g.cpu()))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-9)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-6, atol=1e-9)
