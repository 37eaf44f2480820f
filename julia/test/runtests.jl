# Tests of the Julia half of pyneuralode's backend, for machines that have Julia:
#   julia --project=. julia/test/runtests.jl        (from the repository root)
# The Python-driven end-to-end tests are tests/test_julia_e2e.py (pytest -m julia).
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
            abstol = 1e-12, reltol = 1e-10)
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
