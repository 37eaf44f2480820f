"""Tensors ↔ arrays across the Julia boundary, and the flattening of parameters.

Conventions (the same on the Julia side, ``julia/PyNeuralODEBridge.jl``):

* states and parameters cross as 1-D arrays (the C-order flattening of the torch tensor), so no
  row/column-major question arises for them;
* the saved trajectory comes back as Julia's n×k ``Array`` (column ``j`` = state at ``t[j]``);
  juliacall exposes it with column-major strides, so ``np.asarray`` gives an (n, k)
  Fortran-ordered view and its transpose is the C-contiguous (k, n) torch layout;
* cotangents go to Julia as the same n×k matrix, Fortran-ordered (exactly Julia's memory layout);
* only float32/float64 cross; results are copied into torch-owned memory on the state's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_DTYPES = {torch.float64: "float64", torch.float32: "float32"}


def dtype_name(dtype: torch.dtype) -> str:
    """``"float64"``/``"float32"``: the element types the Julia backend supports."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise TypeError(
            f"y0: backend='julia' supports float64 and float32 states, got {dtype}; convert with "
            "y0.double()"
        ) from None


def to_julia_vector(x: torch.Tensor) -> np.ndarray:
    """A tensor as the 1-D C-order float array Julia copies into a ``Vector{T}``."""
    dtype_name(x.dtype)
    return np.ascontiguousarray(x.detach().reshape(-1).cpu().numpy())


def to_julia_matrix(g: torch.Tensor) -> np.ndarray:
    """Cotangents ``(k, *shape)`` → the n×k Fortran-ordered matrix (column j = cotangent at
    t[j])."""
    k = g.shape[0]
    return np.asfortranarray(g.detach().reshape(k, -1).cpu().numpy().T)


def from_julia_matrix(a, shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """Julia's n×k trajectory → a torch tensor ``(k, *shape)`` (copied, torch-owned)."""
    arr = np.asarray(a)
    n = int(np.prod(shape)) if len(shape) else 1
    if arr.ndim != 2 or arr.shape[0] != n:
        raise RuntimeError(
            f"julia backend: expected an n×k trajectory with n={n}, got shape {arr.shape}"
        )
    k = arr.shape[1]
    out = torch.from_numpy(np.array(arr.T, order="C", dtype=np.dtype(_DTYPES[dtype])))
    return out.reshape(k, *shape).to(device)


def from_julia_vector(a, shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """A Julia vector → a torch tensor of ``shape`` (copied, torch-owned)."""
    arr = np.array(np.asarray(a), dtype=np.dtype(_DTYPES[dtype])).reshape(-1)
    return torch.from_numpy(arr).reshape(tuple(shape)).to(device)


def as_tensor(a, dtype: torch.dtype, device) -> torch.Tensor:
    """A Julia array (or numpy) handed to a Python callback → a tensor. CPU: zero-copy view."""
    t = torch.as_tensor(np.asarray(a))
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device)


def write(out, value: torch.Tensor) -> None:
    """Fill a Julia output array (a writable juliacall ``ArrayValue`` or numpy array) in place."""
    dst = np.asarray(out)
    src = value.detach().cpu().numpy()
    if dst.size != src.size:
        raise RuntimeError(
            f"julia backend: output has {dst.size} entries, the torch value {src.size}"
        )
    dst[...] = src.reshape(dst.shape)


class ParamLayout:
    """The flat parameter vector ``p`` that Julia sees: module parameters, then tensor args.

    ``entries``: (kind, key, shape) with kind ``"param"`` (key = parameter name for
    ``torch.func.functional_call``) or ``"arg"`` (key = position in ``args``); only tensors that
    require grad are included (the others stay constants on the Python side). An empty layout
    still gives Julia a length-1 dummy vector (SciMLSensitivity needs parameters).
    """

    def __init__(self, f, args: Sequence, dtype: torch.dtype, device):
        self.entries: list[tuple[str, object, torch.Size]] = []
        self.tensors: list[torch.Tensor] = []
        if isinstance(f, torch.nn.Module):
            for name, prm in f.named_parameters():
                if prm.requires_grad:
                    self._add("param", name, prm, dtype, device)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                self._add("arg", i, a, dtype, device)
        self.args = tuple(args)
        self.dtype = dtype
        self.device = device
        self.numels = [int(np.prod(s)) if len(s) else 1 for _, _, s in self.entries]
        self.n = sum(self.numels)

    def _add(self, kind, key, t, dtype, device):
        if t.dtype != dtype:
            raise TypeError(
                f"{'parameter ' + key if kind == 'param' else f'args[{key}]'}: dtype {t.dtype} "
                "differs from the state's "
                f"{dtype}; backend='julia' passes all parameters in the state's dtype (cast with "
                f".to({dtype}))"
            )
        if t.device != torch.device(device):
            raise ValueError(
                f"{'parameter ' + key if kind == 'param' else f'args[{key}]'}: on {t.device}, the "
                f"state is on {device}"
            )
        self.entries.append((kind, key, t.shape))
        self.tensors.append(t)

    @property
    def julia_length(self) -> int:
        return max(self.n, 1)

    def flatten(self) -> torch.Tensor:
        """The differentiable flat vector (``torch.cat``), length ``julia_length``."""
        if not self.tensors:
            return torch.zeros(1, dtype=self.dtype, device=self.device)
        return torch.cat([t.reshape(-1) for t in self.tensors])

    def unflatten(self, flat: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple]:
        """``flat`` → (parameter dict for ``functional_call``, args with the tensor args
        replaced)."""
        params: dict[str, torch.Tensor] = {}
        args = list(self.args)
        i = 0
        for (kind, key, shape), m in zip(self.entries, self.numels):
            v = flat[i : i + m].reshape(shape)
            i += m
            if kind == "param":
                params[key] = v
            else:
                args[key] = v
        return params, tuple(args)
