# Tests of the Julia half of pyneuralode's backend, for machines that have Julia:
#   julia --project=. -e 'using Pkg; Pkg.instantiate()'   (once, needs network)
#   julia --project=. julia/test/runtests.jl              (from the repository root; offline)
# The Python-driven end-to-end tests are tests/test_julia_e2e.py (pytest -m julia).
#
# Offline: PythonCall (loaded by the bridge) would provision its own Python through CondaPkg,
# which needs network. The Null backend with a local Python skips that (PythonCall
# docs/src/pythoncall.md:318-335, JULIA_CONDAPKG_BACKEND / JULIA_PYTHONCALL_EXE); set either
# variable yourself to override.
if !haskey(ENV, "JULIA_CONDAPKG_BACKEND")
    ENV["JULIA_CONDAPKG_BACKEND"] = "Null"
    haskey(ENV, "JULIA_PYTHONCALL_EXE") ||
        (ENV["JULIA_PYTHONCALL_EXE"] = something(Sys.which("python3"), Sys.which("python"), "python3"))
end
using Test, LinearAlgebra
include(joinpath(@__DIR__, "..", "PyNeuralODEBridge.jl"))
using .PyNeuralODEBridge

# A linear "MLP" (one bias-free Linear layer, torch weight W, flattened in C order):
# du/dt = W u, exact solution exp(W t) u0.
const W = [-0.5 1.0; -1.0 -0.3]
const p = vec(permutedims(W))             # torch's C-order flattening of the (out, in) weight
const code = """
(u, p, t) -> begin
    h = reshape(u, 2, :)
    h = transpose(reshape(view(p, 1:4), 2, 2)) * h
    vec(h)
end
"""

@testset "PyNeuralODEBridge" begin
    f = build_mlp(code)
    u0 = [1.0, 0.5]
    ts = collect(range(0.0, 1.5; length = 5))
    @testset "factories" begin
        for name in ("Tsit5", "DP5", "Vern7", "Rodas5P", "KenCarp4", "Kvaerno5", "FBDF")
            @test make_solver(name) !== nothing
        end
        @test_throws ErrorException make_solver("NoSuchSolver")
        for name in ("InterpolatingAdjoint", "BacksolveAdjoint", "QuadratureAdjoint", "GaussAdjoint", "SteadyStateAdjoint")
            @test make_sensealg(name) !== nothing
        end
    end
    @testset "forward and backward, $solver / $sense" for solver in ("Tsit5", "Rodas5P", "KenCarp4"),
        sense in ("InterpolatingAdjoint", "BacksolveAdjoint", "QuadratureAdjoint", "GaussAdjoint")

        ys, rc, st, handle = forward(f, u0, p, ts; solver, ad = "forwarddiff", sensealg = sense,
            abstol = 1e-12, reltol = 1e-10, quad_abstol = 1e-12, quad_reltol = 1e-10)
        @test rc == "Success"
        exact = reduce(hcat, [exp(W * t) * u0 for t in ts])
        @test ys ≈ exact rtol = 1e-7
        G = ones(2, length(ts))                     # L = sum of all saved states
        du0, dp = backward(handle, G)
        @test du0 ≈ sum(exp(W * t)' * ones(2) for t in ts) rtol = 1e-5
        # dp against central finite differences of the exact solution
        L(q) = sum(sum(exp(permutedims(reshape(q, 2, 2)) * t) * u0) for t in ts)
        fd = [(L(p .+ 1e-6 .* (1:4 .== i)) - L(p .- 1e-6 .* (1:4 .== i))) / 2e-6 for i in 1:4]
        @test dp ≈ fd rtol = 1e-5
    end
    exact(q, t) = exp(permutedims(reshape(q, 2, 2)) * t) * u0
    fdgrad(L, q) = [(L(q .+ 1e-6 .* (1:4 .== i)) - L(q .- 1e-6 .* (1:4 .== i))) / 2e-6 for i in 1:4]
    @testset "backward in time keeps the order of ts, $sense" for sense in
        ("InterpolatingAdjoint", "BacksolveAdjoint", "GaussAdjoint")
        tr = reverse(ts)                            # bug 4: SciMLSensitivity sorts saveat
        ys, rc, _, handle = forward(f, u0, p, tr; solver = "Tsit5", sensealg = sense,
            abstol = 1e-12, reltol = 1e-10)
        @test rc == "Success"
        @test ys ≈ reduce(hcat, [exp(W * (t - tr[1])) * u0 for t in tr]) rtol = 1e-7
        du0, dp = backward(handle, ones(2, length(tr)))
        L(q) = sum(sum(exp(permutedims(reshape(q, 2, 2)) * (t - tr[1])) * u0) for t in tr)
        @test dp ≈ fdgrad(L, p) rtol = 1e-5
    end
    @testset "fixed-step Euler with the checkpointed adjoints, $sense" for sense in
        ("InterpolatingAdjoint", "GaussAdjoint")
        # bug 6: the checkpoint re-solves need dt, which now sits on the problem
        ys, rc, _, handle = forward(f, u0, p, ts; solver = "Euler", sensealg = sense,
            dt = 1e-4, adaptive = false)
        @test rc == "Success"
        du0, dp = backward(handle, ones(2, length(ts)))
        @test dp ≈ fdgrad(q -> sum(sum(exact(q, t)) for t in ts), p) rtol = 1e-2
    end
    @testset "array tolerances are refused in backward" begin
        ys, rc, _, handle = forward(f, u0, p, ts; abstol = [1e-10, 1e-9], reltol = 1e-8)
        @test rc == "Success"                       # bug 5: the forward solve accepts them
        @test_throws ArgumentError backward(handle, ones(2, length(ts)))
    end
    @testset "a failed solve returns the partial trajectory" begin
        # bug 7: maxiters stops the solve early; only the save times reached come back
        tl = collect(range(0.0, 50.0; length = 11))
        ys, rc, _, _ = forward(f, u0, p, tl; solver = "Tsit5", maxiters = 20,
            abstol = 1e-12, reltol = 1e-12)
        @test rc == "MaxIters"
        @test 1 <= size(ys, 2) < length(tl)
        @test ys ≈ reduce(hcat, [exact(p, t) for t in tl[1:size(ys, 2)]]) rtol = 1e-6
    end
    @testset "build_mlp is cached by code" begin
        @test build_mlp(code) === f                 # bug 8: same code, same function type
    end
    @testset "steady state" begin
        # du/dt = W u + b has the steady state -W⁻¹ b; the MLP with bias: p = [vec(W'), b]
        b = [0.3, -0.2]
        fb = build_mlp("""
        (u, p, t) -> begin
            h = reshape(u, 2, :)
            h = transpose(reshape(view(p, 1:4), 2, 2)) * h .+ view(p, 5:6)
            vec(h)
        end
        """)
        z, rc, st, handle = steady(fb, zeros(2), vcat(p, b); abstol = 1e-10, reltol = 1e-10)
        @test rc == "Success"
        @test z ≈ -W \ b atol = 1e-7
        dp = steady_backward(handle, [1.0, 0.0])
        # d z1/d b = -(W⁻¹)[1, :]
        @test dp[5:6] ≈ -inv(W)[1, :] rtol = 1e-5
    end
end
