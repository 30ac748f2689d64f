"""One suite over every registered integrator: convergence order on an ODE with a known solution."""

import math

import numpy as np
import pytest
import torch

from quasistatic.errors import InputError
from quasistatic.integrators import ExplicitRungeKutta, available_integrators, make_integrator, register_integrator


def harmonic(s, y):
    """y'' = −y as a first-order system; y(s) = (cos s, −sin s) from (1, 0)."""
    return torch.stack([y[1], -y[0]])


def integrate(name, steps, **options):
    integrator = make_integrator(name, **options)
    y, h = torch.tensor([1.0, 0.0], dtype=torch.float64), 1.0 / steps
    for i in range(steps):
        y = integrator.step(harmonic, i * h, y, h)
    exact = torch.tensor([math.cos(1.0), -math.sin(1.0)], dtype=torch.float64)
    return float(torch.linalg.vector_norm(y - exact))


FIXED = [n for n in available_integrators() if not make_integrator(n).adaptive]
ADAPTIVE = [n for n in available_integrators() if make_integrator(n).adaptive]


def test_registry_holds_the_documented_methods():
    assert set(available_integrators()) >= {"euler", "heun", "rk4", "dopri5", "bosh3", "adaptive_heun"}


@pytest.mark.parametrize("name", FIXED)
def test_fixed_step_order_matches_declared_order(name):
    steps = np.array([8, 16, 32, 64])
    errors = np.array([integrate(name, int(n)) for n in steps])
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - make_integrator(name).order) < 0.15, (name, slope, errors)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_error_falls_with_tolerance(name):
    loose = integrate(name, 4, rtol=1e-4, atol=1e-6)
    tight = integrate(name, 4, rtol=1e-9, atol=1e-11)
    assert tight < loose / 10, (name, loose, tight)
    assert tight < 1e-5


@pytest.mark.parametrize("name", available_integrators())
def test_every_integrator_is_exact_on_a_constant_field(name):
    y = torch.tensor([2.0, -1.0], dtype=torch.float64)
    out = make_integrator(name).step(lambda s, y: torch.ones_like(y), 0.0, y, 0.25)
    assert torch.allclose(out, y + 0.25, rtol=0, atol=1e-12)


def test_unknown_integrator_lists_the_names():
    with pytest.raises(InputError, match=r"integrator must be one of \{.*rk4.*\}, got 'rk5'"):
        make_integrator("rk5")


def test_an_option_the_integrator_does_not_take_is_refused():
    with pytest.raises(InputError, match=r"options of integrator 'rk4' must be none \(it takes no options\), got 'rtol"):
        make_integrator("rk4", rtol=1e-3)
    with pytest.raises(InputError, match=r"options of integrator 'dopri5' must be among \{atol, rtol\}, got 'tol'"):
        make_integrator("dopri5", tol=1e-3)


def test_bad_tolerance():
    with pytest.raises(InputError, match="rtol must be a number > 0, got -1"):
        make_integrator("dopri5", rtol=-1)


def test_register_a_new_tableau(restored_registries):
    class Midpoint(ExplicitRungeKutta):
        order = 2
        a = ((), (0.5,))
        b = (0.0, 1.0)
        c = (0.0, 0.5)

    register_integrator("midpoint-test", Midpoint)
    errors = [integrate("midpoint-test", n) for n in (16, 32)]
    assert math.log2(errors[0] / errors[1]) == pytest.approx(2, abs=0.1)


def test_hermite_predictor_is_exact_on_a_quadratic_path_and_euler_is_not():
    """y(s) = a + b s + c s²: the parabola through the last point with the current slope is y itself."""
    a, b, c = (torch.tensor(v, dtype=torch.float64) for v in ([1.0, -2.0], [0.5, 3.0], [-4.0, 1.5]))
    path = lambda s: a + b * s + c * s**2  # noqa: E731
    field = lambda s, y: b + 2 * c * s  # noqa: E731
    s, h, previous = 0.3, 0.2, (0.15, path(0.15))
    hermite = make_integrator("hermite").predict(field, s, path(s), h, previous)
    euler = make_integrator("euler").predict(field, s, path(s), h, previous)
    assert torch.allclose(hermite, path(s + h), rtol=0, atol=1e-14)
    assert torch.allclose(euler - path(s + h), -c * h**2, rtol=0, atol=1e-14)
    # without a previous point it is an Euler step
    assert torch.equal(make_integrator("hermite").predict(field, s, path(s), h, None), euler)


def test_hermite_prediction_error_is_third_order():
    """On y'' = −y from the exact previous point: the one-step error falls as h³ (Euler's as h²)."""
    exact = lambda s: torch.tensor([math.cos(s), -math.sin(s)], dtype=torch.float64)  # noqa: E731
    errors = []
    for h in (0.1, 0.05, 0.025):
        predicted = make_integrator("hermite").predict(harmonic, 1.0, exact(1.0), h, (1.0 - h, exact(1.0 - h)))
        errors.append(float(torch.linalg.vector_norm(predicted - exact(1.0 + h))))
    slope = np.log(errors[0] / errors[2]) / np.log(4)
    assert abs(slope - 3) < 0.15, errors
