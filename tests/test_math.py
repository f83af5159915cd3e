"""Gaussian math and evaluate() against closed forms."""
import math

import pytest
import torch
import torch.distributions as D

import common


def test_kl_normal_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    q = D.Normal(mean, (0.5 * logvar).exp())
    expected = D.kl_divergence(q, D.Normal(torch.zeros(5), torch.ones(5))).sum(-1)
    torch.testing.assert_close(common.kl_normal(mean, logvar), expected)
    assert common.kl_normal(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max() == 0


def test_log_normal_prior_and_entropy_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    z = common.reparameterize(mean, logvar, 6, generator=g)                  # [4, 6, 3]
    q = D.Normal(mean.unsqueeze(1), (0.5 * logvar).exp().unsqueeze(1))
    torch.testing.assert_close(common.log_normal(z, mean.unsqueeze(1), logvar.unsqueeze(1)),
                               q.log_prob(z).sum(-1))
    torch.testing.assert_close(common.log_prior(z), D.Normal(0.0, 1.0).log_prob(z).sum(-1))
    torch.testing.assert_close(common.neg_entropy(logvar), -D.Normal(mean, (0.5 * logvar).exp()).entropy().sum(-1))


def test_log_densities_stay_finite_and_exact_at_extreme_logvar():
    """float32: exp(-logvar) overflows below logvar -88 (the old formula gave NaN at z == mean), and at
    logvar -60 z - mean rounds to 0 against mean 1, losing the eps^2 term: sample_q takes it from eps."""
    for logvar in (-60.0, -90.0, -200.0, 80.0):
        mean, lv = torch.ones(2, 3), torch.full((2, 3), logvar)
        g = torch.Generator().manual_seed(0)
        z, log_q = common.sample_q(mean, lv, 4, generator=g)
        eps = torch.randn((2, 4, 3), generator=torch.Generator().manual_seed(0))
        expected = -0.5 * (3 * math.log(2 * math.pi) + 3 * logvar + eps.pow(2).sum(-1).double())
        torch.testing.assert_close(log_q.double(), expected, rtol=1e-6, atol=0)
        at_mean = common.log_normal(mean, mean, lv)                          # exactly at the mean
        torch.testing.assert_close(at_mean.double(), torch.full((2,), -0.5 * 3 * (math.log(2 * math.pi) + logvar),
                                                               dtype=torch.float64), rtol=1e-6, atol=0)
    # away from the mean at logvar -100: the density is tiny but its log is finite (about -1.3e37)
    far = common.log_normal(torch.tensor([1e-3]), torch.zeros(1), torch.tensor([-100.0]))
    assert torch.isfinite(far) and far.item() == pytest.approx(-0.5 * (math.log(2 * math.pi) - 100 + 1e-6 * math.exp(100)), rel=1e-5)
    # ordinary values: unchanged (the old formula, to rounding)
    g = torch.Generator().manual_seed(3)
    z, mean, logvar = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    old = -0.5 * (math.log(2 * math.pi) + logvar + (z - mean).pow(2) * torch.exp(-logvar)).sum(-1)
    torch.testing.assert_close(common.log_normal(z, mean, logvar), old, rtol=1e-6, atol=1e-6)
    z, log_q = common.sample_q(mean, logvar, 3, generator=g)
    torch.testing.assert_close(log_q, common.log_normal(z, mean.unsqueeze(1), logvar.unsqueeze(1)), rtol=1e-5, atol=1e-5)


def test_reparameterize_moments():
    g = torch.Generator().manual_seed(2)
    mean, logvar = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, math.log(4.0)]])
    z = common.reparameterize(mean, logvar, 200000, generator=g)[0]
    torch.testing.assert_close(z.mean(0), mean[0], atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(0), logvar[0].exp(), atol=0.05, rtol=0.02)


class LinearGaussian(torch.nn.Module):
    """z ~ N(0, I_d), x | z ~ N(W z + b, s^2 I_D): log p(x) = log N(x; b, W W^T + s^2 I) exactly,
    and the posterior is Gaussian with precision I + W^T W / s^2."""

    def __init__(self, D_=6, d=2, s=0.7, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W, self.b, self.s = torch.randn(D_, d, generator=g), torch.randn(D_, generator=g), s

    def log_prob(self, x, z):
        mean = z @ self.W.T + self.b                                      # [batch, n, D]
        return D.Normal(mean, self.s).log_prob(x.unsqueeze(1)).sum(-1)

    def cost_per_sample(self, x):
        return x.shape[1]

    def exact_log_px(self, x):
        cov = self.W @ self.W.T + self.s ** 2 * torch.eye(len(self.b))
        return D.MultivariateNormal(self.b, cov).log_prob(x)

    def posterior(self, x):
        precision = torch.eye(self.W.shape[1]) + self.W.T @ self.W / self.s ** 2
        cov = torch.linalg.inv(precision)
        return (x - self.b) @ self.W @ cov.T / self.s ** 2, cov


def linear_gaussian_data(model, n=200, seed=3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.W.shape[1], generator=g)
    return z @ model.W.T + model.b + model.s * torch.randn(n, len(model.b), generator=g)


def mean_field_infer(model, shift=0.0):
    """The mean-field optimum of the ELBO: posterior mean, variance 1 / diag(precision); `shift`
    moves the mean away from it to make q worse."""
    def infer(x):
        mean, cov = model.posterior(x)
        precision = torch.linalg.inv(cov)
        return mean + shift, (1 / precision.diagonal()).log().expand_as(mean)
    return infer


def test_iw_nll_matches_exact_log_likelihood_and_bounds_elbo():
    torch.manual_seed(0)
    model = LinearGaussian()
    x = linear_gaussian_data(model)
    exact = -model.exact_log_px(x).mean().item()
    result = common.evaluate(mean_field_infer(model, shift=0.3), model, list(x.split(50)), iw_samples=2000)
    assert abs(result["nll"] - exact) < 0.1, (result["nll"], exact)
    assert result["neg_elbo"] - exact > 0.1           # q is off the posterior: the ELBO has a real gap
    assert result["nll"] <= result["neg_elbo"]
    assert result["neg_elbo"] == pytest.approx(result["rec"] + result["kl"])
    assert result["ppl"] is None and result["num_examples"] == 200


def test_iw_bound_does_not_decrease_in_k():
    torch.manual_seed(1)
    model = LinearGaussian(seed=1)
    x = linear_gaussian_data(model, n=400, seed=4)
    infer = mean_field_infer(model, shift=0.5)        # a poor q makes the bound move a lot with k
    exact = -model.exact_log_px(x).mean().item()
    nll = [common.evaluate(infer, model, list(x.split(100)), iw_samples=k)["nll"] for k in (1, 5, 50, 500)]
    assert all(a >= b - 0.02 for a, b in zip(nll, nll[1:])), nll
    assert nll[0] - nll[-1] > 0.3 and nll[-1] >= exact - 0.05, (nll, exact)


class FixedDecoder(torch.nn.Module):
    """log p(x|z) = 0: only inference matters for MI and AU."""

    def log_prob(self, x, z):
        return torch.zeros(z.shape[:2])

    def cost_per_sample(self, x):
        return 1


def test_mi_and_au_on_collapsed_and_informative_encoders():
    torch.manual_seed(2)
    x = torch.randn(256, 3)
    collapsed = common.evaluate(lambda x: (torch.zeros(len(x), 4), torch.zeros(len(x), 4)),
                                FixedDecoder(), list(x.split(32)), iw_samples=200)
    assert abs(collapsed["mi"]) < 0.01 and collapsed["au"] == 0 and collapsed["kl"] == 0

    # Two informative dimensions (well-separated means, tiny variance) and two collapsed ones:
    # MI reaches its ceiling log(batch size) and exactly two units are active.
    def informative(x):
        mean = torch.cat([3 * x[:, :2], torch.zeros(len(x), 2)], 1)
        logvar = torch.cat([torch.full((len(x), 2), -8.0), torch.zeros(len(x), 2)], 1)
        return mean, logvar
    result = common.evaluate(informative, FixedDecoder(), list(x.split(32)), iw_samples=50)
    assert result["au"] == 2
    assert abs(result["mi"] - math.log(32)) < 0.05, result["mi"]
