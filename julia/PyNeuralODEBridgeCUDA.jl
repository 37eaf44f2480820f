# PyNeuralODEBridgeCUDA: zero-copy exchange of torch CUDA tensors with CUDA.jl through DLPack.
#
# Loaded by pyneuralode only when a CUDA state meets the native (translated-MLP) path. 1-D
# tensors (states, parameters) have no layout question; an n×k Julia matrix shared to torch
# appears as a (k, n) tensor (DLPack reverses the dimensions of column-major arrays), which is
# exactly the (time, state) layout pyneuralode wants, and a (k, n) torch cotangent wraps as the
# n×k Julia matrix. Streams are not synchronised by DLPack.jl: Python calls
# `torch.cuda.synchronize()` before handing data over and `synchronize()` below before reading.
module PyNeuralODEBridgeCUDA

using CUDA
using DLPack
using PythonCall

export from_torch, to_torch, synchronize, cuda_info

"""Wrap a torch CUDA tensor as a `CuArray` without copying (`to_dlpack` = `torch.utils.dlpack.to_dlpack`)."""
from_torch(t::Py, to_dlpack::Py) = DLPack.wrap(t, to_dlpack)

"""Share a Julia array with torch without copying (`from_dlpack` = `torch.from_dlpack`); CPU arrays move to the GPU first."""
function to_torch(A, from_dlpack::Py)
    B = A isa CuArray ? A : CuArray(A)
    return DLPack.share(B, from_dlpack)
end

synchronize() = (CUDA.synchronize(); nothing)

"""`(functional, device name, CUDA runtime version)` for the doctor."""
function cuda_info()
    CUDA.functional() || return (false, "", "")
    return (true, string(CUDA.name(CUDA.device())), string(CUDA.runtime_version()))
end

end # module
