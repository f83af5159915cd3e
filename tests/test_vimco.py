"""vimco.py against exact enumeration: for d <= 3 binary latents and k <= 3 samples every k-tuple of latent states is
enumerated, so E_q[L_k] and its gradient (autograd through the enumerated sum) are exact. VIMCO's estimator must
average to that gradient (float64 and float32) with clearly less variance than the plain score-function estimator;
evaluate()'s IW-NLL, KL, MI and AU for a Bernoulli q must equal their enumerated values; and the script runs."""
import itertools
import math
import os
import runpy
import sys
import types

import pytest
import torch
import torch.nn as nn

import analysis
import common
from conftest import ROOT, read_metrics

D, PIXELS = 3, 6                                          # latent units, pixels


class LogisticDecoder(nn.Module):
    """p(x|h) = prod_i Bernoulli(x_i; sigmoid(W h + b)): a one-layer sigmoid belief network's bottom layer."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(D, PIXELS)

    def log_prob(self, x, h, generator=None):            # x [batch, PIXELS], h [batch, n, D] -> [batch, n]
        return VIMCO.Bernoulli(self.net(h)).log_prob(x.unsqueeze(1))

    def cost_per_sample(self, x):
        return PIXELS


def tiny_model(dtype, seed=0):
    torch.manual_seed(seed)
    encoder, decoder, prior = nn.Linear(PIXELS, D), LogisticDecoder(), VIMCO.BernoulliPrior(D)
    for p in [*encoder.parameters(), *decoder.parameters(), *prior.parameters()]:
        nn.init.uniform_(p, -1.5, 1.5)
    x = (torch.rand(2, PIXELS) < 0.5).to(dtype)
    return encoder.to(dtype), decoder.to(dtype), prior.to(dtype), x


def params(encoder, decoder, prior):
    return [*encoder.parameters(), *decoder.parameters(), *prior.parameters()]


STATES = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)))      # all 2^D latent states


def exact_bound(encoder, decoder, prior, x, k):
    """E_q[L_k] per example, summing over all (2^D)^k tuples: prod_j q(h_j|x) * log (1/k) sum_j f(x, h_j)."""
    q = VIMCO.Bernoulli(encoder(x))
    states = STATES.to(x.dtype).expand(len(x), -1, -1)                             # [batch, 2^D, D]
    log_q = q.log_prob(states.transpose(0, 1)).T                                   # [batch, 2^D]
    log_f = decoder.log_prob(x, states) + prior.log_prob(states) - log_q
    tuples = torch.tensor(list(itertools.product(range(len(STATES)), repeat=k)))   # [(2^D)^k, k]
    weight = log_q[:, tuples].sum(-1).exp()                                        # [batch, tuples]
    return (weight * (torch.logsumexp(log_f[:, tuples], -1) - math.log(k))).sum(-1)


def run_vimco(*argv):
    saved = sys.argv
    sys.argv = ["vimco.py", *map(str, argv)]
    try:
        return runpy.run_path(os.path.join(ROOT, "vimco.py"), run_name="__test__")
    finally:
        sys.argv = saved


VIMCO = types.SimpleNamespace()     # vimco.py's globals (its Bernoulli q and prior among them), set by the fixture


@pytest.fixture(scope="module", autouse=True)
def vimco(tmp_path_factory):
    """vimco.py run through its command line, in this process (one epoch on 40 images, d = 8): its globals, whose
    vimco_bound is the function under test, and its folder."""
    folder = tmp_path_factory.mktemp("vimco") / "run"
    ns = run_vimco("--train_size", "40", "--eval_size", "20", "--epochs", "1", "--iw_samples", "5",
                   "--latent_dim", "8", "--examples", "2", "--save_dir", folder)
    vars(VIMCO).update(ns)
    return {**ns, "folder": folder}


def estimates(vimco_bound, model, k, draws, groups, plain=False):
    """The gradient estimate averaged over `draws` draws, in `groups` groups: [groups, parameters] group means."""
    encoder, decoder, prior, x = model
    means = []
    for _ in range(groups):
        xs = x.repeat_interleave(draws // groups, 0)                               # each example, draws times
        q = VIMCO.Bernoulli(encoder(xs))
        bound, surrogate = vimco_bound(decoder, prior, xs, q, k)
        if plain:                                  # the score-function estimator without a baseline: signal L_k
            h, log_q = q.sample(k)
            log_f = decoder.log_prob(xs, h) + prior.log_prob(h) - log_q
            bound = torch.logsumexp(log_f, 1) - math.log(k)
            surrogate = bound + bound.detach() * log_q.sum(1)
        grads = torch.autograd.grad(surrogate.mean(), params(encoder, decoder, prior))   # over examples and draws
        means.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(means)


@pytest.mark.parametrize("dtype,k", [(torch.float64, 2), (torch.float64, 3), (torch.float32, 3)])
def test_vimco_gradient_averages_to_the_exact_gradient_by_enumeration(vimco, dtype, k):
    model = tiny_model(dtype, seed=k)
    encoder, decoder, prior, x = model
    exact = torch.autograd.grad(exact_bound(encoder, decoder, prior, x, k).mean(), params(encoder, decoder, prior))
    exact = torch.cat([g.flatten() for g in exact])
    torch.manual_seed(1)
    groups = estimates(vimco["vimco_bound"], model, k, draws=60000, groups=100)
    mean, se = groups.mean(0), groups.std(0) / math.sqrt(len(groups))
    z = (mean - exact) / se.clamp_min(1e-12)                  # (a weight of a pixel that is 0 in both examples: 0 / 0)
    assert z.abs().max() < 5, (z, exact, mean)                # every parameter, within a few standard errors
    assert (se < 0.1 * exact.abs().max()).all()               # and the comparison has power
    assert exact.abs().max() > 0.1


def test_vimco_has_clearly_less_variance_than_the_plain_score_function(vimco):
    """The encoder's part of the gradient, one draw per group: the leave-one-out baselines take most of its variance."""
    for k in (2, 3):
        model = tiny_model(torch.float64, seed=10 + k)
        n_encoder = sum(p.numel() for p in model[0].parameters())
        torch.manual_seed(2)
        ours = estimates(vimco["vimco_bound"], model, k, draws=400, groups=200)[:, :n_encoder].var(0).sum()
        plain = estimates(vimco["vimco_bound"], model, k, draws=400, groups=200, plain=True)[:, :n_encoder].var(0).sum()
        assert ours < 0.25 * plain, (k, ours, plain)       # measured: 0.01 to 0.07 over seeds


def test_evaluate_scores_a_bernoulli_q_exactly():
    """IW-NLL (5,000 samples) against log p(x) by enumeration; KL, MI's entropy and AU against their definitions."""
    encoder, decoder, prior, x = tiny_model(torch.float64, seed=7)
    with torch.no_grad():
        states = STATES.double().expand(len(x), -1, -1)
        log_px = torch.logsumexp(decoder.log_prob(x, states) + prior.log_prob(states), 1)
        q = VIMCO.Bernoulli(encoder(x))
        log_q = q.log_prob(states.transpose(0, 1)).T                              # [batch, 2^D]
        kl = (log_q.exp() * (log_q - prior.log_prob(states))).sum(1)
        entropy = -(log_q.exp() * log_q).sum(1)
    torch.manual_seed(3)
    metrics = common.evaluate(lambda x: VIMCO.Bernoulli(encoder(x)), decoder, prior, [x], 5000)
    assert metrics["nll"] == pytest.approx(-log_px.mean().item(), abs=0.01)
    assert metrics["kl"] == pytest.approx(kl.mean().item(), rel=1e-9)
    torch.testing.assert_close(q.entropy(), entropy, rtol=1e-9, atol=0)
    assert q.kl(prior).sum() > 0 and metrics["au"] == int((torch.sigmoid(encoder(x)).var(0) >= 0.01).sum())


def test_vimco_runs_through_its_command_line_and_refuses_what_it_cannot_train(vimco, tmp_path):
    metrics = read_metrics(vimco["folder"])
    assert metrics["method"] == "vimco" and math.isfinite(metrics["nll"]) and metrics["kl"] >= 0
    assert metrics["nll"] <= metrics["neg_elbo"] + 1e-3 and (vimco["folder"] / "samples.png").exists()
    assert isinstance(vimco["prior"], VIMCO.BernoulliPrior) and len(vimco["prior"].logits) == 8
    for case, (flags, fragment) in enumerate(((["--k", "1"], "--k >= 2"), (["--dataset", "synthetic"], "is for images"),
                                              (["--gaps", "3"], "no --gaps"))):
        with pytest.raises(SystemExit, match=fragment):
            run_vimco(*flags, "--save_dir", tmp_path / str(case))         # (each its own folder: the lock stays held)
    with pytest.raises(SystemExit, match="the gaps compare Gaussian q's; this method's q is Bernoulli"):  # analysis.py RUN --gaps
        analysis.gaps(vimco["infer"], vimco["decoder"], vimco["prior"], vimco["dataset"].batches("test", 5), 3, 10, 0)
