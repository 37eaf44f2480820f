# A workload for PackageCompiler: solves and adjoints on the native (Julia-only) path, so a
# system image holds compiled code of OrdinaryDiffEq, SciMLSensitivity, Zygote and
# SteadyStateDiffEq for the bridge's call patterns. Build (once, from the repository root, with
# PackageCompiler in your global environment):
#
#   julia --project=. -e 'using PackageCompiler; create_sysimage(
#       ["OrdinaryDiffEqTsit5", "OrdinaryDiffEqRosenbrock", "SciMLSensitivity", "SteadyStateDiffEq",
#        "Zygote", "PythonCall"]; sysimage_path = "pyneuralode-sysimage.so",
#       precompile_execution_file = "julia/sysimage/precompile_workload.jl")'
#
# Use it from Python with PYTHON_JULIACALL_SYSIMAGE=/path/to/pyneuralode-sysimage.so (juliacall
# option `sysimage`, PythonCall docs/src/juliacall.md:138). The bridge is included into a fresh
# module per session, so its own closures still compile on the first call; the image removes
# the package loading and most of the generic compilation. Nothing here has been run yet.
if !haskey(ENV, "JULIA_CONDAPKG_BACKEND")  # offline, as julia/test/runtests.jl
    ENV["JULIA_CONDAPKG_BACKEND"] = "Null"
    haskey(ENV, "JULIA_PYTHONCALL_EXE") ||
        (ENV["JULIA_PYTHONCALL_EXE"] = something(Sys.which("python3"), Sys.which("python"), "python3"))
end
include(joinpath(@__DIR__, "..", "PyNeuralODEBridge.jl"))
using .PyNeuralODEBridge

let
    code = """
    (u, p, t) -> begin
        h = reshape(u, 2, :)
        h = tanh.(transpose(reshape(view(p, 1:4), 2, 2)) * h .+ view(p, 5:6))
        vec(h)
    end
    """
    f = build_mlp(code)
    p = [-0.5, -1.0, 1.0, -0.3, 0.1, -0.2]
    ts = collect(range(0.0, 1.0; length = 4))
    for T in (Float64, Float32), solver in ("Tsit5", "Rodas5P"),
        sense in ("InterpolatingAdjoint", "GaussAdjoint")

        ys, rc, st, handle = forward(f, T[1, 0.5], T.(p), ts; solver, sensealg = sense,
            ad = "forwarddiff")
        backward(handle, ones(T, size(ys)))
    end
    z, rc, st, handle = steady(f, zeros(2), p)
    steady_backward(handle, ones(2))
end
