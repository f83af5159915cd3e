"""common.py: Gaussian math and the prior against torch.distributions and closed forms, evaluate() against exact
log p(x), MI and AU on constructed encoders, the networks' structure (the PixelCNN is autoregressive), the model
interface check, and the paths chosen for the device (svi_mode, evaluation chunks)."""
import math
import re
import types

import pytest
import torch
import numpy as np
import torch.distributions as D

import common


PRIOR = common.StandardNormal(5)


def test_kl_normal_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    q = D.Normal(mean, (0.5 * logvar).exp())
    expected = D.kl_divergence(q, D.Normal(torch.zeros(5), torch.ones(5))).sum(-1)
    torch.testing.assert_close(PRIOR.kl(mean, logvar), expected)
    assert PRIOR.kl(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max() == 0


def test_log_normal_prior_and_entropy_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    z = common.reparameterize(mean, logvar, 6, generator=g)                  # [4, 6, 3]
    q = D.Normal(mean.unsqueeze(1), (0.5 * logvar).exp().unsqueeze(1))
    torch.testing.assert_close(common.log_normal(z, mean.unsqueeze(1), logvar.unsqueeze(1)),
                               q.log_prob(z).sum(-1))
    torch.testing.assert_close(PRIOR.log_prob(z), D.Normal(0.0, 1.0).log_prob(z).sum(-1))
    draws = PRIOR.sample(100000, torch.Generator().manual_seed(0))
    assert draws.shape == (100000, 5) and draws.mean(0).abs().max() < 0.02 and (draws.var(0) - 1).abs().max() < 0.02


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

    def log_prob(self, x, z, generator=None):
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


PRIOR2 = common.StandardNormal(2)


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
    result = common.evaluate(mean_field_infer(model, shift=0.3), model, PRIOR2, list(x.split(50)), iw_samples=2000)
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
    nll = [common.evaluate(infer, model, PRIOR2, list(x.split(100)), iw_samples=k)["nll"] for k in (1, 5, 50, 500)]
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
                                FixedDecoder(), common.StandardNormal(4), list(x.split(32)), iw_samples=200)
    assert abs(collapsed["mi"]) < 0.01 and collapsed["au"] == 0 and collapsed["kl"] == 0

    # Two informative dimensions (well-separated means, tiny variance) and two collapsed ones:
    # MI reaches its ceiling log(batch size) and exactly two units are active.
    def informative(x):
        mean = torch.cat([3 * x[:, :2], torch.zeros(len(x), 2)], 1)
        logvar = torch.cat([torch.full((len(x), 2), -8.0), torch.zeros(len(x), 2)], 1)
        return mean, logvar
    result = common.evaluate(informative, FixedDecoder(), common.StandardNormal(4), list(x.split(32)), iw_samples=50)
    assert result["au"] == 2
    assert abs(result["mi"] - math.log(32)) < 0.05, result["mi"]


def decoder_and_batch(dropout=0.5):
    torch.manual_seed(0)
    decoder = common.LSTMDecoder(vocab_size=30, emb_dim=8, hidden_dim=16, latent_dim=3, dropout=dropout)
    for p in decoder.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)
    x = torch.cat([torch.zeros(6, 1, dtype=torch.long), torch.randint(3, 30, (6, 7))], 1)
    return decoder, x


def objective_gradient(decoder, x, mode):
    """The gradient of the SVI objective with respect to lambda = (mean, logvar), as the steps compute it."""
    mean, logvar = (torch.randn(6, 3, generator=torch.Generator().manual_seed(1)) for _ in range(2))
    lam = [mean.requires_grad_(), logvar.requires_grad_()]
    with torch.enable_grad(), mode:
        generator = torch.Generator().manual_seed(2)
        f = common.svi_objective(decoder, common.StandardNormal(3), x, *lam, 1.0, generator).sum()
        return f.detach(), torch.autograd.grad(f, lam)


def test_svi_mode_equals_eval_mode_and_is_restored():
    decoder, x = decoder_and_batch()
    decoder.eval()
    f_eval, g_eval = objective_gradient(decoder, x, torch.backends.cudnn.flags(enabled=False))   # the former path
    f_mode, g_mode = objective_gradient(decoder, x, common.svi_mode(decoder))
    assert torch.equal(f_eval, f_mode) and all(torch.equal(a, b) for a, b in zip(g_eval, g_mode))
    assert not decoder.training and not decoder.lstm.training                # restored
    decoder.train()                                                          # the decoder's dropout would differ:
    f_train, _ = objective_gradient(decoder, x, common.svi_mode(decoder))
    assert not torch.equal(f_train, f_eval)                                  # the test can tell the modes apart
    assert decoder.lstm.training                                             # a training LSTM is left as it was


def test_svi_mode_is_restored_after_an_error():
    decoder, _ = decoder_and_batch()
    decoder.eval()
    try:
        with common.svi_mode(decoder):
            assert decoder.lstm.training and not decoder.training
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert not decoder.lstm.training


def test_evaluation_chunks_do_not_change_the_result():
    decoder, x = decoder_and_batch(dropout=0.0)
    decoder.eval()
    encoder = common.LSTMEncoder(30, 8, 16, 3)
    assert common.chunk_floats(torch.device("cpu")) == 2 ** 25
    results = []
    for max_floats in (None, 2 ** 25):                       # the device's default is that size on a CPU
        torch.manual_seed(3)
        results.append(common.evaluate(encoder, decoder, common.StandardNormal(3), [x, x[:4]], 20, max_floats=max_floats))
    assert results[0] == results[1]

    def narrow(x):    # q nearly a point, so that every sample is the mean whatever the chunks draw
        return torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(4)), torch.full((x.shape[0], 3), -40.0)
    one_call, one_sample_per_call = (common.evaluate(narrow, decoder, common.StandardNormal(3), [x, x[:4]], 20, max_floats=m)
                                   for m in (None, 300))
    for key in ("rec", "kl", "neg_elbo"):
        assert abs(one_call[key] - one_sample_per_call[key]) < 1e-5 * abs(one_call[key]), key


def test_decoder_log_prob_equals_its_logits():
    """log_prob against a cross-entropy of the decoder's own logits, dropout masks replayed from the same generator
    (SA-VAE's backward loop relies on it)."""
    torch.manual_seed(0)
    decoder = common.LSTMDecoder(vocab_size=4000, emb_dim=8, hidden_dim=16, latent_dim=3, dropout=0.5).double()
    x = torch.cat([torch.zeros(6, 1, dtype=torch.long), torch.randint(3, 4000, (6, 7))], 1)
    z = torch.randn(6, 2, 3, dtype=torch.float64)
    fused = decoder.log_prob(x, z, torch.Generator().manual_seed(4))
    logits, _ = decoder.logits(x[:, :-1].repeat_interleave(2, 0), z.reshape(12, 3), generator=torch.Generator().manual_seed(4))
    targets = x[:, 1:].repeat_interleave(2, 0)
    reference = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(-1)
    assert decoder.training
    assert torch.allclose(fused, reference.view(6, 2), rtol=1e-12, atol=1e-12)


def pixel_log_prob(decoder, x, z):
    """log p(x_i | x_<i, z) of every pixel, [batch, 784], from the decoder's logits."""
    return common.bernoulli_log_prob(decoder.logits(x, z), x).flatten(1)


def test_pixelcnn_term_of_pixel_i_ignores_every_later_pixel():
    torch.manual_seed(0)
    decoder = common.PixelCNNDecoder(latent_dim=2, channels=8).eval()
    x = (torch.rand(1, 1, 28, 28) < 0.5).float()
    z = torch.randn(1, 1, 2)
    # Copy k keeps pixels 0..k (raster order) and redraws every later pixel.
    keep = torch.arange(784).view(1, -1) <= torch.arange(784).view(-1, 1)               # [copy, pixel]
    redrawn = (torch.rand(784, 784) < 0.5).float()
    copies = torch.where(keep, x.view(1, -1), redrawn).view(784, 1, 28, 28)
    with torch.no_grad():
        base = pixel_log_prob(decoder, x, z[:, 0])[0]                                       # [784]
        terms = torch.cat([pixel_log_prob(decoder, c, z[:, 0].expand(len(c), -1)) for c in copies.split(196)])
    change = (terms - base.view(1, -1)).abs()      # kernels differ with batch size: float noise ~1e-7
    assert change[keep].max() < 1e-5, f"{(change[keep] >= 1e-5).sum()} terms changed when only later pixels changed"
    assert (change.masked_fill(keep, 0) > 1e-4).any(1)[:700].all()   # the model does use the earlier pixels


def test_pixelcnn_has_no_blind_spot_and_uses_z():
    torch.manual_seed(1)
    decoder = common.PixelCNNDecoder(latent_dim=2, channels=8).eval()
    x = (torch.rand(1, 1, 28, 28) < 0.5).float()
    z = torch.randn(1, 1, 2)
    with torch.no_grad():
        base = pixel_log_prob(decoder, x, z[:, 0])[0].view(28, 28)
        for row, col in [(13, 16), (12, 17), (14, 13), (13, 14)]:      # above-right: a plain PixelCNN's blind spot
            flipped = x.clone()
            flipped[0, 0, row, col] = 1 - flipped[0, 0, row, col]
            assert (pixel_log_prob(decoder, flipped, z[:, 0])[0].view(28, 28)[14, 14] - base[14, 14]).abs() > 1e-4, (row, col)
        moved = (pixel_log_prob(decoder, x, z[:, 0] + 1)[0] - base.flatten()).abs() > 1e-6
        assert moved[0] and moved.float().mean() > 0.98        # z reaches every pixel, the first included


def test_bernoulli_log_likelihood_from_logits_is_not_clamped():
    logits, x = torch.tensor([100.0, -100.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(common.bernoulli_log_prob(logits, x), torch.tensor([-100.0, 0.0, -np.log(2.0)], dtype=torch.float32))
    mlp = common.MLPDecoder(latent_dim=3, hidden=5)
    images = (torch.rand(4, 1, 28, 28) < 0.5).float()
    assert mlp.log_prob(images, torch.randn(4, 6, 3)).shape == (4, 6)


def test_a_changed_model_missing_a_method_fails_at_once_naming_it():
    class Decoder(torch.nn.Module):                 # a decoder written without sample and cost_per_sample
        def log_prob(self, x, z, generator=None):
            return torch.zeros(z.shape[:2])
    with pytest.raises(SystemExit, match=r"error: the decoder \(Decoder\) has no sample, cost_per_sample"):
        common.check_model({"decoder": Decoder(), "prior": common.StandardNormal(2)})
    with pytest.raises(SystemExit, match=r"the prior \(Module\) has no log_prob, sample, kl"):
        common.check_model({"decoder": common.MLPDecoder(2), "prior": torch.nn.Module()})
    with pytest.raises(SystemExit, match="no 'prior'"):
        common.check_model({"decoder": common.MLPDecoder(2)})
    common.check_model({"decoder": common.MLPDecoder(2), "prior": common.StandardNormal(2)})   # complete: passes


def test_long_phases_print_where_they_are_and_the_time_left(capsys):
    """The progress lines showed a rate, but no step count per epoch and no time left; a long test printed nothing."""
    progress = common.Progress("test", 40, " examples", every=0)
    progress(10)
    assert re.fullmatch(r"test 10/40 examples, \d+ s left\n", capsys.readouterr().out)
    meter = common.Meter(types.SimpleNamespace(print_every=2, save_dir="x"), 1, 3)
    for _ in range(3):
        meter.add(1.0, neg_elbo=torch.ones(4), kl=torch.zeros(4))
    assert re.fullmatch(r"epoch 1 step 2/3: -elbo 1\.000 kl 0\.000 kl_weight 1\.000 \d+ examples/s, \d+ s left\n",
                        capsys.readouterr().out)
    assert common.duration(30) == "30 s" and common.duration(600) == "10 min" and common.duration(9000) == "2.5 h"
