# PyNeuralODEBridgeCUDA: zero-copy exchange of torch CUDA tensors with CUDA.jl through DLPack.
#
# Loaded by pyneuralode only when a CUDA state meets the native (translated-MLP) path. 1-D
# tensors (states, parameters) have no layout question; an n×k Julia matrix shared to torch
# appears as a (k, n) tensor (DLPack reverses the dimensions of column-major arrays), which is
# exactly the (time, state) layout pyneuralode wants, and a (k, n) torch cotangent wraps as the
# n×k Julia matrix. Streams are not synchronised by DLPack.jl: Python calls
# `torch.cuda.synchronize()` before handing data over and `synchronize()` below before reading.
#
# CUDA.jl and DLPack.jl are not in pyneuralode/juliapkg.json (CPU users never install them):
# `pyneuralode.julia.install(cuda=True)` adds them from pyneuralode/julia/juliapkg-cuda.json.
# CUDA stays at "5": DLPack.jl 0.3.1 ext/CUDAExt.jl:32-36 compares with `CUDA.Mem.DeviceBuffer`,
# and CUDA.jl 6.0 removed `CUDA.Mem`.
module PyNeuralODEBridgeCUDA

using CUDA: CUDA, CuArray
using DLPack: DLPack
using PythonCall: PythonCall, Py

export from_torch, to_torch, synchronize, cuda_info

# No `::Py` on Python-object arguments (bug 2): juliacall converts a torch tensor argument to a
# `PyIterable` (PythonCall Wrap/Wrap.jl rules: no array interface, but `__iter__`), which `::Py`
# does not match. DLPack.jl's PythonCall extension accepts `Union{Py, PyArray, PyIterable}`
# (DLPack.jl@07bf27d ext/PythonCallExt.jl:21, `wrap` at :86); `Py(x)` unwraps any of them
# (PythonCall@34d3f55 src/Core/Py.jl:111, src/Wrap/PyIterable.jl:5), and `share` wants a `Py`
# (ext/PythonCallExt.jl:111).
"""Wrap a torch CUDA tensor as a `CuArray` without copying (`to_dlpack` = `torch.utils.dlpack.to_dlpack`)."""
from_torch(t, to_dlpack) = DLPack.wrap(Py(t), Py(to_dlpack))

"""Share a Julia array with torch without copying (`from_dlpack` = `torch.from_dlpack`); CPU arrays move to the GPU first."""
function to_torch(A, from_dlpack)
    B = A isa CuArray ? A : CuArray(A)
    return DLPack.share(B, Py(from_dlpack))
end

synchronize() = (CUDA.synchronize(); nothing)

"""`(functional, device name, CUDA runtime version)` for the doctor."""
function cuda_info()
    CUDA.functional() || return (false, "", "")
    return (true, string(CUDA.name(CUDA.device())), string(CUDA.runtime_version()))
end

end # module
