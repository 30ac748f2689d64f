"""Processes turn sensitivities into control rates that satisfy their constraints (eqs. 20–32)."""

import pytest
import torch

from quasistatic import Controls
from quasistatic.errors import InputError
from quasistatic.processes import (
    ConstraintProcess,
    SingularConstraintError,
    available_processes,
    make_process,
)
from quasistatic.continuation.tangents import Sensitivities

START = Controls(1.0, 10.0)


def sensitivities(seed=0):
    """A consistent sensitivity matrix: rows R, D, C from a negative-definite F Hessian, F row by
    the first law; values (R, D, C)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(3, 3, generator=g, dtype=torch.float64)
    hess = -(m @ m.T + 0.5 * torch.eye(3, dtype=torch.float64))[:2, :2]  # [[D_λ, D_γ], [C_λ, C_γ]]
    t_col = torch.randn(3, generator=g, dtype=torch.float64)  # R_t, D_t, C_t
    rdc = torch.zeros(3, 3, dtype=torch.float64)
    rdc[1:3, 0:2] = hess
    rdc[0, 0:2] = -START.lam * hess[0] - START.gamma * hess[1]  # R_s = −λD_s − γC_s (first law)
    rdc[:, 2] = t_col
    values = torch.tensor([5.0, 20.0, 0.3], dtype=torch.float64)
    f_row = torch.tensor([1.0, START.lam, START.gamma], dtype=torch.float64) @ rdc + torch.stack(
        [values[1], values[2], torch.tensor(0.0, dtype=torch.float64)])
    return Sensitivities(torch.cat([rdc, f_row[None]]), values)


def constraint_rate(process, sens, rates):
    w = torch.tensor(process.constraint, dtype=torch.float64)
    return float(w @ sens.matrix[:3] @ torch.tensor(rates, dtype=torch.float64))


@pytest.mark.parametrize("name, params", [
    ("iso-classification", {"lam_end": 2.0}),
    ("iso-classification", {"alpha": 0.7}),
    ("iso-c-rate", {"lam_end": 2.0, "beta": 3.0}),
    ("iso-classification-transfer", {"lam_end": 1.5}),
    ("constant-lambda-rate", {"k": -1.5}),
    ("geodesic-transfer", {"slope": -0.2}),
])
def test_constrained_processes_hold_their_constraint(name, params):
    sens = sensitivities()
    process = make_process(name, START, **params)
    rates = process.control_velocity(0.0, START, sens)
    assert constraint_rate(process, sens, rates) == pytest.approx(0.0, abs=1e-12)
    assert any(abs(r) > 0 for r in rates)


def test_iso_classification_rates_are_eq_20_and_remark_7():
    sens = sensitivities(1)
    lam_dot, gamma_dot, t_dot = make_process("iso-classification", START, lam_end=3.0).control_velocity(0, START, sens)
    assert (lam_dot, t_dot) == (2.0, 0.0)
    assert gamma_dot == pytest.approx(-sens("C", "lam") * 2.0 / sens("C", "gamma"))
    alpha = make_process("iso-classification", START, alpha=0.5).control_velocity(0, START, sens)
    assert alpha == pytest.approx((-0.5 * sens("C", "gamma"), 0.5 * sens("C", "lam"), 0.0))
    assert alpha[0] > 0  # Remark 10: λ̇ > 0 for α > 0 since C_γ < 0


def test_geodesic_transfer_solves_eq_30():
    sens = sensitivities(2)
    k = -0.3
    lam_dot, gamma_dot, t_dot = make_process("geodesic-transfer", START, slope=k).control_velocity(0, START, sens)
    rho = sens("R", "t") + START.lam * sens("D", "t") + START.gamma * sens("C", "t")
    d_dot = sens("D", "lam") * lam_dot + sens("D", "gamma") * gamma_dot + sens("D", "t") * t_dot
    r_dot = sens("R", "lam") * lam_dot + sens("R", "gamma") * gamma_dot + sens("R", "t") * t_dot
    assert d_dot == pytest.approx(k * rho / (1 + k * START.lam))
    assert d_dot == pytest.approx(k * r_dot)  # the straight line dD/dR = k
    assert t_dot == 1.0


def test_geodesic_transfer_is_a_straight_line_with_the_entropy_term():
    """With σ > 0 the first law has a σṠ term (eq. 7), so R's row is no longer −λD − γC: the
    rates must still give dD/dR = k and Ċ = 0 from the rows as they are (the paper's eq. 30,
    which eliminates Ṙ with the σ-free first law, would not)."""
    sens = sensitivities(3)
    shifted = sens.matrix.clone()
    shifted[0, :] += torch.tensor([0.7, -0.4, 0.25], dtype=torch.float64)  # −σS_s added to R's row
    sens = Sensitivities(shifted, sens.values)
    k = -0.3
    rates = torch.tensor(make_process("geodesic-transfer", START, slope=k).control_velocity(0, START, sens),
                         dtype=torch.float64)
    r_dot, d_dot, c_dot = (sens.matrix[:3] @ rates).tolist()
    assert d_dot == pytest.approx(k * r_dot) and c_dot == pytest.approx(0.0, abs=1e-12)


def test_free_process_returns_its_rates():
    assert make_process("free", START, lam_rate=0.5, gamma_rate=-1.0).control_velocity(0, START, sensitivities()) \
        == (0.5, -1.0, 0.0)


def test_a_new_process_by_subclassing():
    class IsoDistortion(ConstraintProcess):
        """Keep D constant while λ grows."""

        weights = (0.0, 1.0, 0.0)

        def driven_rates(self, s, controls):
            return 1.0, 0.0

    sens = sensitivities(3)
    process = IsoDistortion(START)
    rates = process.control_velocity(0, START, sens)
    assert constraint_rate(process, sens, rates) == pytest.approx(0.0, abs=1e-12)
    assert float(process.constraint_value(sens.values)) == pytest.approx(20.0)


def test_singular_constraint_is_a_clear_error():
    sens = sensitivities()
    sens.matrix[2, 1] = 0.0  # C_γ = 0
    with pytest.raises(SingularConstraintError, match="constraint derivative along gamma must be non-zero"):
        make_process("iso-classification", START, lam_end=2.0).control_velocity(0, START, sens)


@pytest.mark.parametrize("name, params, message", [
    ("iso-classification", {"lam_end": 1.0}, "lam_end must be different from the starting lambda"),
    ("iso-classification", {}, "exactly one of lam_end or alpha"),
    ("iso-c-rate", {"lam_end": 2.0, "beta": 0.0}, "beta must be a number > 0"),
    ("geodesic-transfer", {"slope": -1.0}, "slope must be different from -1/lambda"),
    ("free", {}, "not both zero"),
    ("iso-classification", {"lam_end": 2.0, "speed": 3},
     r"options of process 'iso-classification' must be among \{alpha, lam_end\}, got 'speed'"),
])
def test_bad_process_parameters(name, params, message):
    with pytest.raises(InputError, match=message):
        make_process(name, START, **params)


def test_unknown_process_lists_the_names():
    with pytest.raises(InputError, match=r"process must be one of \{.*iso-classification.*\}, got 'iso-x'"):
        make_process("iso-x", START)
    assert "iso-c-rate" in available_processes()
