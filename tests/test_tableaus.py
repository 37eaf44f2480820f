"""Tableau consistency: every registered tableau re-validates, the checks catch broken ones,
and the order-condition machinery itself is right (tree counts, known methods)."""

import dataclasses

import numpy as np
import pytest

import pyneuralode as pn
from pyneuralode.solvers import REGISTRY, ButcherTableau, explicit
from pyneuralode.solvers._tableau import dense_order_conditions, order_conditions, tree_gamma, trees

SOLVER_CLASSES = sorted(set(REGISTRY.values()), key=lambda c: c.__name__)
TABLEAU_CLASSES = [
    c for c in SOLVER_CLASSES if dataclasses.is_dataclass(getattr(c, "tableau", None))
]
EXPLICIT = [getattr(explicit, n) for n in explicit.__all__]


def test_every_explicit_method_is_registered_with_a_butcher_tableau():
    names = {c.__name__ for c in EXPLICIT}
    assert names == {
        "Euler",
        "Midpoint",
        "Heun",
        "RK4",
        "BS3",
        "Dopri5",
        "Tsit5",
        "Vern7",
        "DP8",
        "Heun3",
        "RK438",
        "Fehlberg2",
    }
    for cls in EXPLICIT:
        assert REGISTRY[cls.__name__.lower()] is cls
        assert REGISTRY[cls.name.lower()] is cls
        assert isinstance(cls.tableau, ButcherTableau) and cls.tableau.explicit
    assert REGISTRY["dopri8"] is pn.DP8 and REGISTRY["dopri5"] is pn.Dopri5


@pytest.mark.parametrize("cls", TABLEAU_CLASSES, ids=lambda c: c.__name__)
def test_registered_tableau_revalidates(cls):
    tab = cls.tableau
    again = dataclasses.replace(tab)  # runs every construction check again
    assert again is not tab
    if isinstance(tab, ButcherTableau):
        conds = order_conditions(tab.a, tab.b, tab.c, tab.order)
        assert len(conds) == sum(len(trees(n)) for n in range(1, tab.order + 1))
        worst = max(abs(lhs - rhs) for lhs, rhs in conds.values())
        assert worst < 1e-10
        # The method is not of higher order than claimed (the order is tight).
        higher = order_conditions(tab.a, tab.b, tab.c, tab.order + 1)
        assert max(abs(lhs - rhs) for lhs, rhs in higher.values()) > 1e-8


def test_tree_counts_and_densities():
    assert [len(trees(n)) for n in range(1, 9)] == [1, 1, 2, 4, 9, 20, 48, 115]
    assert (
        tree_gamma(()) == 1
        and tree_gamma(((),)) == 2
        and tree_gamma(((), ())) == 3
        and tree_gamma((((),),)) == 6
    )


def test_known_orders():
    expected = {
        "Euler": 1,
        "Midpoint": 2,
        "Heun": 2,
        "RK4": 4,
        "BS3": 3,
        "Dopri5": 5,
        "Tsit5": 5,
        "Vern7": 7,
        "DP8": 8,
        "Heun3": 3,
        "RK438": 4,
        "Fehlberg2": 2,
    }
    for cls in EXPLICIT:
        assert cls().order == expected[cls.__name__]
    assert pn.Euler().error_order is None and pn.RK4().error_order is None
    assert pn.Tsit5().error_order == 4 and pn.Vern7().error_order == 6 and pn.DP8().error_order == 7


@pytest.mark.parametrize("cls", [pn.Dopri5, pn.Tsit5, pn.Vern7, pn.DP8], ids=lambda c: c.__name__)
def test_continuous_extension_orders(cls):
    tab = cls.tableau
    A, c = tab.extended()
    q = tab.dense_order
    assert q == {"Dopri5": 4, "Tsit5": 4, "Vern7": 6, "DP8": 7}[cls.__name__]
    conds = dense_order_conditions(A, tab.dense, c, q)
    assert max(np.max(np.abs(lhs - rhs)) for lhs, rhs in conds.values()) < 1e-10
    # b_i(1) = b_i and Σ_i b_i(θ) = θ.
    assert np.allclose(tab.dense.sum(1)[: tab.stages], tab.b, atol=1e-12)
    col = tab.dense.sum(0)
    assert abs(col[0] - 1) < 1e-12 and np.all(np.abs(col[1:]) < 1e-10)


def _fields(tab):
    return {f.name: getattr(tab, f.name) for f in dataclasses.fields(tab)}


def _broken(tab, **changes):
    kw = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in _fields(tab).items()}
    for k, fn in changes.items():
        kw[k] = fn(kw[k])
    return kw


def _bump(idx, delta=1e-6):
    def f(x):
        x = x.copy()
        x[idx] += delta
        return x

    return f


@pytest.mark.parametrize(
    "cls,change,match",
    [
        (pn.RK4, dict(b=_bump(1, 1e-3), c=lambda c: c), "weights sum"),
        (pn.RK4, dict(a=_bump((2, 1), 1e-3)), "do not sum to c"),
        (
            pn.Dopri5,
            dict(a=_bump((3, 1), 1e-6), c=_bump(3, 1e-6)),
            "order condition",
        ),  # rows sum, order fails
        (pn.Tsit5, dict(b_error=_bump(2, 1e-6)), "error weights"),
        (pn.Dopri5, dict(b_error=lambda e: e + np.array([1e-3, 0, -1e-3, 0, 0, 0, 0])), "embedded"),
        (pn.Dopri5, dict(dense=_bump((2, 1), 1e-6)), "dense output"),
        (
            pn.Dopri5,
            dict(dense=lambda B: B + np.outer([1e-4, 0, -1e-4, 0, 0, 0, 0], [1, -1, 0, 0])),
            "continuous-extension",
        ),
        (pn.DP8, dict(a_extra=_bump((1, 0), 1e-6), c_extra=_bump(1, 1e-6)), "continuous-extension"),
        (pn.DP8, dict(a_extra=_bump((1, 0), 1e-3)), "a_extra"),
        (pn.DP8, dict(b_error2=_bump(0, 1e-3)), "error weights"),
        (pn.Vern7, dict(a=_bump((9, 2), 1e-9), c=_bump(9, 1e-9)), "order condition"),
        (
            pn.BS3,
            dict(
                a=lambda a: np.vstack([a[:-1], a[-1] * 0.5 + 0.5 * np.array([0, 0.5, 0.5, 0])]),
                c=lambda c: c,
            ),
            "FSAL",
        ),
    ],
)
def test_broken_tableau_raises(cls, change, match):
    with pytest.raises(ValueError, match=match):
        ButcherTableau(**_broken(cls.tableau, **change))


def test_broken_tableau_shape_raises():
    with pytest.raises(ValueError, match="shapes"):
        ButcherTableau(a=np.zeros((2, 2)), b=[1.0], c=[0.0], order=1)
    with pytest.raises(ValueError, match="a_extra"):
        ButcherTableau(**_broken(pn.DP8.tableau, a_extra=lambda x: x[:, :-1]))
