"""R, D, C (eqs. 1, 4) against closed forms and hand-computed cross-entropies; J's determinism."""

import math

import numpy as np
import pytest
import torch

from quasistatic import Controls, DataMixture, LabeledData, ModelConfig, Objective, ParameterLayout, build_model
from quasistatic.thermo.functionals import FixedNoiseFunctionals, fixed_noise
from quasistatic.errors import InputError
from quasistatic.models.priors import StandardNormalPrior



def tiny_data(n=6, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return LabeledData(x, y, classes, tuple(map(str, range(classes))))


def tiny_model(prior="normal", seed=0):
    config = ModelConfig(input_shape=(1, 2, 2), num_classes=3, latent_dim=2, hidden=(5,), prior=prior,
                         prior_components=1)
    return build_model(config, seed=seed).double()


def test_closed_form_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.5
    eps = torch.randn(200_000, 4, 3, generator=g, dtype=torch.float64)
    z = mu + torch.exp(0.5 * logvar) * eps
    log_e = (-0.5 * (eps**2 + logvar + math.log(2 * math.pi))).sum(-1)
    mc = (log_e - StandardNormalPrior().log_prob(z)).mean(0)
    closed = StandardNormalPrior().kl(mu, logvar)
    assert torch.allclose(mc, closed, rtol=0, atol=0.03), (mc, closed)


def test_mixture_prior_rate_is_monte_carlo_kl():
    """A one-component mixture at N(0, I) is the standard normal: its Monte-Carlo rate on many
    fixed samples must approach the closed form used for the standard normal prior."""
    data = tiny_data()
    mog = tiny_model(prior="mog")
    with torch.no_grad():
        mog.prior.means.zero_()
        mog.prior.log_scales.zero_()
    normal = tiny_model(prior="normal")
    normal.load_state_dict({k: v for k, v in mog.state_dict().items() if not k.startswith("prior.")})
    r_mc = FixedNoiseFunctionals(mog, data, samples=100_000)(ParameterLayout(mog).read(mog))[0]
    r_cf = FixedNoiseFunctionals(normal, data, samples=1)(ParameterLayout(normal).read(normal))[0]
    assert abs(r_mc - r_cf) < 0.02 * max(1.0, abs(r_cf))


def test_distortion_and_classification_are_hand_computed_cross_entropies():
    data = tiny_data()
    model = tiny_model()
    theta = ParameterLayout(model).read(model)
    f = FixedNoiseFunctionals(model, data, samples=2, noise_seed=3)
    R, D, C = f(theta).tolist()
    with torch.no_grad():
        mu, logvar = model.encode(data.x)
        z = mu + torch.exp(0.5 * logvar) * f.noise  # (2, n, d)
        p = torch.sigmoid(model.decoder(z)).numpy().reshape(2, len(data), -1)
        logits = model.classifier(z).numpy()
    x = data.x.numpy().reshape(len(data), -1)
    bce = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(-1).mean()
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_softmax, data.y.numpy()[None, :, None].repeat(2, 0), -1).mean()
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1).mean()
    assert D == pytest.approx(bce, rel=1e-12)
    assert C == pytest.approx(ce, rel=1e-12)
    assert R == pytest.approx(float(kl), rel=1e-12)


def test_objective_is_repeatable_bit_for_bit_and_chunk_invariant():
    data = tiny_data(n=10)
    model = tiny_model()
    controls = Controls(1.5, 4.0)
    a = Objective(model, data, samples=3, noise_seed=7)
    b = Objective(model, data, samples=3, noise_seed=7, chunk_size=3)
    theta = a.initial_theta()
    assert torch.equal(a.value(theta, controls), a.value(theta, controls))
    assert torch.equal(a.value(theta, controls), Objective(model, data, samples=3, noise_seed=7).value(theta, controls))
    assert torch.allclose(a.value(theta, controls), b.value(theta, controls), rtol=1e-14)
    other = Objective(model, data, samples=3, noise_seed=8).value(theta, controls)
    assert not torch.equal(a.value(theta, controls), other)


def test_objective_is_linear_in_the_controls():
    data, model = tiny_data(), tiny_model()
    obj = Objective(model, data)
    theta = obj.initial_theta()
    R, D, C = obj.functionals(theta)
    assert obj.value(theta, Controls(2.0, 3.0)) == pytest.approx(float(R + 2 * D + 3 * C), rel=1e-14)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_mixture_objective_is_the_weighted_average(t):
    source, target = tiny_data(seed=1), tiny_data(n=9, seed=2)
    model = tiny_model()
    controls = Controls(1.0, 2.0, t)
    mixed = Objective(model, DataMixture(source, target), noise_seed=5)
    j_s = Objective(model, source, noise_seed=5)
    j_t = Objective(model, target, noise_seed=6)
    theta = mixed.initial_theta()
    expected = (1 - t) * j_s.value(theta, Controls(1.0, 2.0)) + t * j_t.value(theta, Controls(1.0, 2.0))
    assert mixed.value(theta, controls) == pytest.approx(float(expected), rel=1e-14)


def test_functional_call_path_mutates_nothing():
    model = build_model(ModelConfig(architecture="resnet18", input_shape=(3, 16, 16), width=4,
                                    likelihood="gaussian", latent_dim=2), seed=0).double()
    data = LabeledData(torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2]), 10, tuple("0123456789"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obj = Objective(model, data)
    theta = obj.initial_theta()
    obj.gradient(theta + 0.01, Controls(1.0, 1.0))
    assert list(model.buffers()) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_parameter_layout_round_trip():
    model = tiny_model()
    layout = ParameterLayout(model)
    theta = layout.read(model)
    assert theta.shape == (layout.numel,)
    assert torch.equal(layout.flatten(layout.unflatten(theta)), theta)
    layout.write(model, theta * 2)
    assert torch.equal(layout.read(model), theta * 2)


def test_bad_controls_and_samples():
    with pytest.raises(InputError, match="lambda must be a number >= 0, got -1"):
        Controls(-1.0, 1.0)
    with pytest.raises(InputError, match="gamma must be a number >= 0"):
        Controls(1.0, -0.5)
    with pytest.raises(InputError, match=r"mixture time t must be in \[0, 1\], got 1.5"):
        Controls(1.0, 1.0, 1.5)
    with pytest.raises(InputError, match="number of samples K must be an integer >= 1, got 0"):
        fixed_noise(0, 3, 2, 0, torch.float64)


def test_sigma_adds_the_weight_entropy_term_everywhere():
    """J = R + λD + γC + σS with S = ½‖θ‖² (eq. 6): in the value, the gradient, the Gauss–Newton
    operator (+σI) and the combination gradients used by the corrector."""
    from quasistatic.linalg.operators import CurvatureOperator

    data, model = tiny_data(), tiny_model()
    plain, weighted = Objective(model, data), Objective(model, data, sigma=0.3)
    theta, controls = plain.initial_theta(), Controls(1.5, 2.0)
    assert float(weighted.value(theta, controls)) == pytest.approx(
        float(plain.value(theta, controls)) + 0.15 * float(theta @ theta), rel=1e-14)
    assert torch.allclose(weighted.gradient(theta, controls), plain.gradient(theta, controls) + 0.3 * theta,
                          rtol=1e-12, atol=1e-14)
    v = torch.randn(theta.numel(), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ggn = CurvatureOperator(weighted, theta, controls, kind="ggn")(v)
    assert torch.allclose(ggn, CurvatureOperator(plain, theta, controls, kind="ggn")(v) + 0.3 * v, atol=1e-12)
    rows = torch.stack([controls.weights(theta), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)])
    values, gradients = weighted.combination_gradients(theta, rows, with_entropy=torch.tensor([1.0, 0.0]))
    assert torch.allclose(gradients[0], weighted.gradient(theta, controls), atol=1e-12)
    assert float(values[1]) == pytest.approx(float(plain.functionals(theta)[2]), rel=1e-14)
    with pytest.raises(InputError, match="sigma must be a number >= 0, got -1"):
        Objective(model, data, sigma=-1.0)
