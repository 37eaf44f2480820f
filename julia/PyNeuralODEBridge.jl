# PyNeuralODEBridge: the Julia half of pyneuralode's `backend="julia"`.
#
# Python (pyneuralode/julia/_session.py) `include`s this file into a fresh module and calls the
# entry points below with plain vectors and keyword arguments (strings, numbers, bools), so the
# Julia surface stays small and string-configured. Every automatic-differentiation choice is
# made explicitly here: nothing pushes ForwardDiff duals, Tracker or Enzyme through Python.
#
#   * Python vector field  -> `TorchRHS` (callback path): f, its VJP and its Jacobian are torch
#     calls; Zygote meets the callback through the `ChainRulesCore.rrule` below (one
#     `torch.func.vjp` gives both the state and the parameter parts), and the `vjp`/`vjp_p`
#     fields of `ODEFunction` are set as a fallback when `vjp="fields"`.
#   * nn.Sequential MLP     -> generated plain-array Julia code (`build_mlp`, native path): the
#     solve and the adjoint run entirely in Julia (Zygote through Julia code), also on CUDA.jl
#     arrays.
#
# Written from the SciML sources, never executed here (no Julia on the development machines):
# every name, keyword and field used below is listed with the package, version and source line
# it was read from in pyneuralode/julia/VERIFIED.md, and tests/test_julia_verified.py checks that
# the table covers this file. julia/test/runtests.jl exercises it wherever Julia is installed.
module PyNeuralODEBridge

using LinearAlgebra
# OrdinaryDiffEq v7 exports only Tsit5, Vern6-9, Rosenbrock23, Rodas5P and FBDF
# (OrdinaryDiffEq.jl@b211787 src/OrdinaryDiffEq.jl:132-135); every solver is imported from the
# sub-package that defines and exports it, which works on the v6 (1.x) and v7 (2.x) sub-packages.
using OrdinaryDiffEqTsit5: OrdinaryDiffEqTsit5, Tsit5
using OrdinaryDiffEqVerner: OrdinaryDiffEqVerner, Vern7, Vern9
using OrdinaryDiffEqLowOrderRK: OrdinaryDiffEqLowOrderRK, Euler, Midpoint, Heun, RK4, BS3, DP5
using OrdinaryDiffEqRosenbrock: OrdinaryDiffEqRosenbrock, Rosenbrock23, Rodas4, Rodas5P
using OrdinaryDiffEqSDIRK: OrdinaryDiffEqSDIRK, ImplicitEuler, TRBDF2, Kvaerno3, Kvaerno5, KenCarp4
using OrdinaryDiffEqBDF: OrdinaryDiffEqBDF, FBDF, QNDF
using SciMLBase: SciMLBase, ODEProblem, ODEFunction, SteadyStateProblem, solve
using SciMLSensitivity: SciMLSensitivity, InterpolatingAdjoint, BacksolveAdjoint,
    QuadratureAdjoint, GaussAdjoint, SteadyStateAdjoint, ZygoteVJP
using SteadyStateDiffEq: SteadyStateDiffEq, DynamicSS
using LinearSolve: KrylovJL_GMRES
using Zygote: Zygote
using ChainRulesCore: ChainRulesCore, NoTangent, ZeroTangent, AbstractZero, unthunk
using ADTypes: AutoFiniteDiff, AutoForwardDiff
using PythonCall: PythonCall, Py, pyconvert

export TorchRHS, make_rhs, build_mlp, make_solver, make_sensealg, forward, backward, steady,
    steady_backward, versions

# -----------------------------------------------------------------------------------------------
# The Python vector field
# -----------------------------------------------------------------------------------------------
"""
    TorchRHS{T}(cb)

Out-of-place right-hand side `f(u, p, t)` that calls the Python object `cb`:

* `cb.f(out, u, p, t)`: writes f into `out`;
* `cb.vjp(du, dp, u, p, t, λ)`: writes `(∂f/∂u)ᵀλ` into `du` and `(∂f/∂p)ᵀλ` into `dp` (one
  `torch.func.vjp`);
* `cb.jac(J, u, p, t)`: writes the n×n Jacobian `∂f/∂u` (`torch.func.jacrev`).

Arguments are fresh `Vector{T}`s (Python sees zero-copy, writable juliacall `ArrayValue`s); the
outputs are filled in place by Python, so no conversion of Python return values is needed.
"""
struct TorchRHS{T}
    cb::Py
end

# Steady-state code (SteadyStateAdjoint, the NonlinearProblem view) calls f with t = nothing.
_time(t) = t === nothing ? Inf : Float64(t)

function (r::TorchRHS{T})(u, p, t) where {T}
    uu = Vector{T}(vec(u))
    out = similar(uu)
    r.cb.f(out, uu, Vector{T}(p), _time(t))
    return out
end

function torch_vjp(r::TorchRHS{T}, u, p, t, λ) where {T}
    uu = Vector{T}(vec(u))
    pp = Vector{T}(p)
    du = similar(uu)
    dp = similar(pp)
    r.cb.vjp(du, dp, uu, pp, _time(t), Vector{T}(vec(λ)))
    return du, dp
end

function torch_jac(r::TorchRHS{T}, u, p, t) where {T}
    uu = Vector{T}(vec(u))
    J = Matrix{T}(undef, length(uu), length(uu))
    r.cb.jac(J, uu, Vector{T}(p), _time(t))
    return J
end

# Zygote (ZygoteVJP inside every continuous adjoint and in SteadyStateAdjoint) uses this rule
# instead of tracing into Python: one Python round trip per vector-Jacobian product.
function ChainRulesCore.rrule(r::TorchRHS{T}, u, p, t) where {T}
    y = r(u, p, t)
    function torchrhs_pullback(Δ)
        Δ = unthunk(Δ)
        (Δ isa AbstractZero) && return (NoTangent(), ZeroTangent(), ZeroTangent(), NoTangent())
        du, dp = torch_vjp(r, u, p, t, Δ)
        return (NoTangent(), reshape(du, size(u)), dp, NoTangent())
    end
    return y, torchrhs_pullback
end

"""
    make_rhs(cb, T; vjp="rrule", jac=true)

The `ODEFunction` around a Python callback object. Out-of-place and `FullSpecialize`, so the
adjoints never re-wrap it in a `FunctionWrappersWrapper` (which would drop `vjp`/`jac`).
`vjp="fields"` also sets the `vjp`/`vjp_p` fields (SciMLSensitivity ≥ 7.97 then calls them
directly: two Python round trips per adjoint step instead of one); `jac=true` supplies the torch
Jacobian to implicit solvers (one `jacrev` instead of n+1 finite-difference calls).
"""
function make_rhs(cb, ::Type{T}; vjp::AbstractString = "rrule", jac::Bool = true) where {T}
    r = TorchRHS{T}(cb isa Py ? cb : Py(cb))
    kw = Dict{Symbol, Any}()
    jac && (kw[:jac] = (u, p, t) -> torch_jac(r, u, p, t))
    if vjp == "fields"
        kw[:vjp] = (λ, u, p, t) -> torch_vjp(r, u, p, t, λ)[1]
        if :vjp_p in fieldnames(ODEFunction)
            kw[:vjp_p] = (λ, u, p, t) -> torch_vjp(r, u, p, t, λ)[2]
        end
    elseif vjp != "rrule"
        error("vjp must be \"rrule\" or \"fields\", got \"$vjp\"")
    end
    return ODEFunction{false, SciMLBase.FullSpecialize}(r; kw...)
end
make_rhs(cb, dtype::AbstractString; kw...) = make_rhs(cb, _eltype(dtype); kw...)

_eltype(dtype::AbstractString) = dtype == "float64" ? Float64 :
                                 dtype == "float32" ? Float32 :
                                 error("dtype must be \"float64\" or \"float32\", got \"$dtype\"")

# -----------------------------------------------------------------------------------------------
# The native path: an MLP translated from torch (Python generates `code`, see pyneuralode/julia/_mlp.py)
# -----------------------------------------------------------------------------------------------
softplus_torch(x) = x > 20 ? x : log1p(exp(x))
sigmoid_torch(x) = inv(one(x) + exp(-x))
silu_torch(x) = x * sigmoid_torch(x)
elu_torch(x) = x > 0 ? x : expm1(x)
relu_torch(x) = max(zero(x), x)
leakyrelu_torch(x, a) = x > 0 ? x : oftype(x, a) * x

# One ODEFunction per generated code string: each `Core.eval` of an anonymous function makes a
# new type, and a new type recompiles the solver, the adjoint and Zygote (bug 8).
const MLP_CACHE = Dict{String, Any}()

"""
    build_mlp(code)

Evaluate generated code `(u, p, t) -> ...` (plain array code on the flattened parameters) and
wrap it in an out-of-place `ODEFunction`, cached by `code`. Zygote differentiates it natively.
"""
function build_mlp(code::AbstractString)
    # Defined here, called only from later top-level calls (forward/steady), so the new
    # method is visible there (no world-age problem, no invokelatest inside Zygote).
    return get!(MLP_CACHE, String(code)) do
        ODEFunction{false, SciMLBase.FullSpecialize}(Core.eval(@__MODULE__, Meta.parse(code)))
    end
end

# -----------------------------------------------------------------------------------------------
# Factories (string-configured; every AD choice explicit)
# -----------------------------------------------------------------------------------------------
const EXPLICIT = Dict{String, Any}(
    "Euler" => Euler, "Midpoint" => Midpoint, "Heun" => Heun, "RK4" => RK4, "BS3" => BS3,
    "DP5" => DP5, "Tsit5" => Tsit5, "Vern7" => Vern7, "Vern9" => Vern9)
const IMPLICIT = Dict{String, Any}(
    "Rosenbrock23" => Rosenbrock23, "Rodas4" => Rodas4, "Rodas5P" => Rodas5P,
    "ImplicitEuler" => ImplicitEuler, "TRBDF2" => TRBDF2, "Kvaerno3" => Kvaerno3,
    "Kvaerno5" => Kvaerno5, "KenCarp4" => KenCarp4, "FBDF" => FBDF, "QNDF" => QNDF)

"""
    make_solver(name; ad="finitediff", linsolve="default")

OrdinaryDiffEq algorithm by its SciML name. Implicit and Rosenbrock methods get
`autodiff=AutoFiniteDiff()` (callback path: never ForwardDiff through Python; a supplied `jac`
is used when the function has one) or `AutoForwardDiff()` (`ad="forwarddiff"`, native path only).
`linsolve="gmres"` gives them `KrylovJL_GMRES()`: Jacobian-free Newton-Krylov, so the adjoint
solve (which reuses this algorithm on the n+np adjoint state) never assembles a dense Jacobian.
"""
function make_solver(name::AbstractString; ad::AbstractString = "finitediff",
        linsolve::AbstractString = "default")
    haskey(EXPLICIT, name) && return EXPLICIT[name]()
    if haskey(IMPLICIT, name)
        backend = ad == "finitediff" ? AutoFiniteDiff() :
                  ad == "forwarddiff" ? AutoForwardDiff() :
                  error("ad must be \"finitediff\" or \"forwarddiff\", got \"$ad\"")
        linsolve == "default" && return IMPLICIT[name](; autodiff = backend)
        linsolve == "gmres" && return IMPLICIT[name](; autodiff = backend, linsolve = KrylovJL_GMRES())
        error("linsolve must be \"default\" or \"gmres\", got \"$linsolve\"")
    end
    error("unknown solver \"$name\"; known: $(join(sort!(vcat(collect(keys(EXPLICIT)), collect(keys(IMPLICIT)))), ", "))")
end

"""
    make_sensealg(name; checkpointing=true, abstol=1e-6, reltol=1e-3)

SciMLSensitivity algorithm by name, always with `autojacvec=ZygoteVJP()` (which reaches Python
only through the `TorchRHS` rrule) and never the automatic choice (that would pick
ForwardDiffSensitivity for small problems).
"""
function make_sensealg(name::AbstractString; checkpointing::Bool = true,
        abstol::Real = 1e-6, reltol::Real = 1e-3)
    ajv = ZygoteVJP()
    name == "InterpolatingAdjoint" && return InterpolatingAdjoint(; autojacvec = ajv, checkpointing)
    name == "BacksolveAdjoint" && return BacksolveAdjoint(; autojacvec = ajv, checkpointing = true)
    name == "QuadratureAdjoint" && return QuadratureAdjoint(; autojacvec = ajv, abstol, reltol)
    name == "GaussAdjoint" && return GaussAdjoint(; autojacvec = ajv, checkpointing)
    name == "SteadyStateAdjoint" && return SteadyStateAdjoint(; autojacvec = ajv, linsolve = KrylovJL_GMRES())
    error("unknown sensealg \"$name\"; known: InterpolatingAdjoint, BacksolveAdjoint, QuadratureAdjoint, GaussAdjoint, SteadyStateAdjoint")
end

_tol(x, ::Type{T}) where {T} = x isa AbstractArray ? Vector{T}(vec(x)) : Float64(x)

# `solve` keywords. They reach the forward solve and, through concrete_solve's `kwargs_init`, the
# adjoint solve (SciMLSensitivity concrete_solve.jl:955-975, sensitivity_interface.jl:487-490).
function _solve_kwargs(::Type{T}; abstol, reltol, dt, adaptive, maxiters, dtmin, dtmax) where {T}
    kw = Dict{Symbol, Any}(:abstol => _tol(abstol, T), :reltol => _tol(reltol, T),
        :adaptive => adaptive, :maxiters => Int(maxiters))
    dt === nothing || (kw[:dt] = Float64(dt))
    dtmin === nothing || (kw[:dtmin] = Float64(dtmin))
    dtmax === nothing || (kw[:dtmax] = Float64(dtmax))
    return kw
end

# `dt`/`adaptive` also go on the problem (bug 6): the checkpoint re-solves of the interpolating
# and Gauss adjoints call `solve(remake(sol.prob, ...), sol.alg; tols...)` with tolerances only
# (interpolating_adjoint.jl:88-91, gauss_adjoint.jl:64-87), and `remake` keeps `prob.kwargs`
# (concrete_solve.jl:572-590 keeps all but the save options).
function _problem_kwargs(; dt, adaptive)
    kw = Dict{Symbol, Any}(:adaptive => adaptive)
    dt === nothing || (kw[:dt] = Float64(dt))
    return kw
end

# Columns of the saved states in the order of `ts` (bug 4): the continuous adjoints but
# BacksolveAdjoint return `sol(sort(saveat))` (concrete_solve.jl:752-757), BacksolveAdjoint the
# solver's save order (:715-719); matching times covers both. `k`: save times reached.
_columns(solt, ts, k) = [argmin(abs.(solt .- t)) for t in view(ts, 1:k)]

# Save times reached by a failed solve (bug 7): concrete_solve interpolates `sol(ts)` at every
# save time, past the failure too, so a plain (non-AD) solve counts the points really saved.
_reached(prob, alg, u0, p, ts, kw) = length(solve(prob, alg; u0, p, saveat = ts, kw...).t)

_stats(sol) = sol.stats === nothing ? (0, 0, 0) :
              (Int(sol.stats.nf), Int(sol.stats.naccept), Int(sol.stats.nreject))

# -----------------------------------------------------------------------------------------------
# Entry points
# -----------------------------------------------------------------------------------------------
"""
    forward(f, u0, p, ts; solver, ad, sensealg, checkpointing, abstol, reltol, dt, adaptive,
            maxiters, dtmin, dtmax, quad_abstol, quad_reltol, linsolve)
        -> (ys, retcode, (nf, naccept, nreject), back)

Solve `du/dt = f(u, p, t)` saving at `ts` (first entry = start; increasing or decreasing) under
`Zygote.pullback`, so the SciMLSensitivity rrule of `solve` (with the explicit `sensealg`) is
recorded. `ys` is the n×k `Array` of saved states, column j at `ts[j]`; after a failed solve,
k counts only the save times reached. `back` is the opaque handle for [`backward`](@ref).
"""
function forward(f, u0, p, ts; solver::AbstractString = "Tsit5", ad::AbstractString = "finitediff",
        sensealg::AbstractString = "InterpolatingAdjoint", checkpointing::Bool = true,
        abstol = 1e-9, reltol = 1e-6, dt = nothing, adaptive::Bool = true, maxiters::Integer = 100_000,
        dtmin = nothing, dtmax = nothing, quad_abstol::Real = 1e-6, quad_reltol::Real = 1e-3,
        linsolve::AbstractString = "default")
    u0j = _asvector(u0)
    T = eltype(u0j)
    pj = _asvector(p, T)
    tsj = Vector{Float64}(ts)
    alg = make_solver(solver; ad, linsolve)
    sense = make_sensealg(sensealg; checkpointing, abstol = quad_abstol, reltol = quad_reltol)
    kw = _solve_kwargs(T; abstol, reltol, dt, adaptive, maxiters, dtmin, dtmax)
    prob = ODEProblem(f, u0j, (tsj[1], tsj[end]), pj; _problem_kwargs(; dt, adaptive)...)
    holder = Ref{Any}(nothing)
    function run(u0_, p_)
        sol = solve(prob, alg; u0 = u0_, p = p_, saveat = tsj, sensealg = sense, kw...)
        idx = ChainRulesCore.ignore_derivatives() do
            holder[] = sol
            ok = SciMLBase.successful_retcode(sol.retcode)
            _columns(sol.t, tsj, ok ? length(tsj) : _reached(prob, alg, u0_, p_, tsj, kw))
        end
        return Array(sol)[:, idx]  # Zygote scatters the cotangent back through the indexing
    end
    # Tensor tolerances cannot reach the adjoint solve, whose state is longer (bug 5): the
    # backward pass refuses them with a clear message (Python refuses them before the solve).
    vector_tols = abstol isa AbstractArray || reltol isa AbstractArray
    local ys, back
    try
        ys, back = Zygote.pullback(run, u0j, pj)
    catch err
        # A failed solve whose save points cannot all be interpolated may throw inside the rrule:
        # return the partial trajectory of a plain solve (no gradient) with its retcode (bug 7).
        plain = solve(prob, alg; saveat = tsj, kw...)
        SciMLBase.successful_retcode(plain.retcode) && rethrow()
        ys = Array(plain)
        handle = (back = nothing, like = ys, vector_tols = vector_tols)
        return ys, string(plain.retcode), _stats(plain), handle
    end
    sol = holder[]
    return ys, string(sol.retcode), _stats(sol), (back = back, like = ys, vector_tols = vector_tols)
end

"""
    backward(back, G) -> (du0, dp)

Cotangents `G` (n×k, one column per saved state) through the pullback recorded by
[`forward`](@ref): SciMLSensitivity solves the adjoint ODE with jumps at the save points.
"""
function backward(handle, G)
    handle.vector_tols && throw(ArgumentError(
        "backward: array abstol/reltol cannot be used for gradients: SciMLSensitivity passes " *
        "them to the adjoint solve, whose state is longer; use scalar tolerances"))
    handle.back === nothing && throw(ArgumentError(
        "backward: the forward solve failed and its save points could not be interpolated; " *
        "there is no gradient through it"))
    Gj = copyto!(similar(handle.like), _asmatrix(G))  # same array type and device as ys
    du0, dp = handle.back(Gj)
    T = eltype(Gj)
    return _dense(du0, size(Gj, 1), T), _dense(dp, nothing, T)
end

"""
    steady(f, z0, p; solver, ad, abstol, reltol, maxiters) -> (z, retcode, (nf, naccept, nreject), back)

Steady state of `dz/dt = f(z, p, t)` with `DynamicSS(solver)` (integrate until the
`TerminateSteadyState` criterion meets abstol/reltol) under `Zygote.pullback`, with
`SteadyStateAdjoint(autojacvec=ZygoteVJP(), linsolve=KrylovJL_GMRES())`: matrix-free, so the
dense-Jacobian (ForwardDiff) branch is never taken.
"""
function steady(f, z0, p; solver::AbstractString = "Tsit5", ad::AbstractString = "finitediff",
        abstol::Real = 1e-8, reltol::Real = 1e-6, maxiters::Integer = 100_000,
        linsolve::AbstractString = "default")
    z0j = _asvector(z0)
    T = eltype(z0j)
    pj = _asvector(p, T)
    alg = DynamicSS(make_solver(solver; ad, linsolve))
    sense = make_sensealg("SteadyStateAdjoint")
    prob = SteadyStateProblem(f, z0j, pj)
    holder = Ref{Any}(nothing)
    function run(p_)
        sol = solve(prob, alg; u0 = z0j, p = p_, sensealg = sense, abstol, reltol,
            odesolve_kwargs = (; abstol, reltol, maxiters = Int(maxiters)))
        ChainRulesCore.ignore_derivatives() do
            holder[] = sol
        end
        return Vector(sol.u)
    end
    z, back = Zygote.pullback(run, pj)
    sol = holder[]
    handle = (back = back, like = z)
    st = hasproperty(sol, :original) && sol.original !== nothing && hasproperty(sol.original, :stats) ?
         _stats(sol.original) : (0, 0, 0)
    return z, string(sol.retcode), st, handle
end

"""
    steady_backward(back, g) -> dp

The cotangent `g` of the steady state through the implicit-function-theorem adjoint.
"""
function steady_backward(handle, g)
    gj = copyto!(similar(handle.like), _asvector(g))
    return _dense(only(handle.back(gj)), nothing, eltype(gj))
end

"""Versions of the loaded packages and the thread count, for `python -m pyneuralode.julia doctor`."""
function versions()
    pkgs = Dict{String, String}()
    for (name, mod) in ("OrdinaryDiffEqTsit5" => OrdinaryDiffEqTsit5,
        "OrdinaryDiffEqVerner" => OrdinaryDiffEqVerner,
        "OrdinaryDiffEqLowOrderRK" => OrdinaryDiffEqLowOrderRK,
        "OrdinaryDiffEqRosenbrock" => OrdinaryDiffEqRosenbrock,
        "OrdinaryDiffEqSDIRK" => OrdinaryDiffEqSDIRK, "OrdinaryDiffEqBDF" => OrdinaryDiffEqBDF,
        "SciMLSensitivity" => SciMLSensitivity, "SciMLBase" => SciMLBase,
        "SteadyStateDiffEq" => SteadyStateDiffEq, "Zygote" => Zygote,
        "ChainRulesCore" => ChainRulesCore, "PythonCall" => PythonCall)
        v = pkgversion(mod)
        pkgs[name] = v === nothing ? "unknown" : string(v)
    end
    return string(VERSION), Threads.nthreads(), pkgs
end

# -----------------------------------------------------------------------------------------------
# Array helpers: copy Python buffers into plain Julia arrays on entry (no aliasing of torch memory)
# -----------------------------------------------------------------------------------------------
# `copy` keeps the device of a CuArray (CUDA path) and turns a PyArray into a plain Array.
_asvector(x) = x isa AbstractArray ? copy(vec(x)) : pyconvert(Vector, x)
_asvector(x, ::Type{T}) where {T} = (v = _asvector(x); eltype(v) === T ? v : T.(v))
_asmatrix(x) = x isa AbstractMatrix ? copy(x) : pyconvert(Matrix, x)
# Gradients go back to Python as plain CPU vectors (`Array` also copies a CuArray to the host).
_dense(x, n, ::Type{T}) where {T} = x === nothing || x isa AbstractZero ?
                                    (n === nothing ? T[] : zeros(T, n)) : Array{T}(vec(unthunk(x)))

end # module
