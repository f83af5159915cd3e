"""iwae.py: the k = 1 bound is the ELBO (and vae.py's loss in expectation); on a linear-Gaussian model
with exact log p(x), L_k rises with k towards log p(x) and the gradient iwae.py trains with is an
unbiased estimate of grad L_k; and the script runs through its command line on a text folder and synthetic
images.

The bound under test is iwae.py's own `iwae_bound`, compiled from the script's text (importing the
script would start training), so these tests check the code that trains.
"""
import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, read_metrics, run_script, run_scripts, succeeded, write_text_corpus

LOG_2PI = math.log(2 * math.pi)


def load_function(script, name):
    """A top-level function of a method script, compiled from the script's own source."""
    path = Path(ROOT) / script
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"common": common, "math": math, "torch": torch}
    exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


iwae_bound = load_function("iwae.py", "iwae_bound")
PRIOR = common.StandardNormal(None)           # p(z) = N(0, I): its methods do not depend on d


class LinearGaussianDecoder:
    """x | z ~ N(W z + b, sigma^2 I) with z ~ N(0, I), so p(x) = N(b, W W^T + sigma^2 I) exactly.
    b may carry leading batch dimensions ([batch, 1, D]) so that each row gets its own gradient."""

    def __init__(self, W, b, sigma):
        self.W, self.b, self.sigma = W, b, sigma

    def log_prob(self, x, z, generator=None):       # the decoder interface: z [batch, n, d] -> [batch, n]
        mu = z @ self.W.T + self.b
        return -0.5 * ((x.unsqueeze(1) - mu) ** 2 / self.sigma ** 2 + LOG_2PI + 2 * math.log(self.sigma)).sum(-1)

    def log_marginal(self, x):
        cov = self.W @ self.W.T + self.sigma ** 2 * torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def posterior(self, x):
        """Exact p(z|x) = N(mu, cov) (full covariance)."""
        precision = torch.eye(self.W.shape[1], dtype=self.W.dtype) + self.W.T @ self.W / self.sigma ** 2
        cov = torch.linalg.inv(precision)
        return (x - self.b) @ self.W @ cov.T / self.sigma ** 2, cov


def elbo_closed_form(decoder, x, mean, logvar):
    """E_q[log p(x|z)] - KL(q || p) for the linear-Gaussian model and a diagonal q, in closed form."""
    var = logvar.exp()
    resid = x - (mean @ decoder.W.T + decoder.b)
    trace = (decoder.W ** 2 @ var.T).T.sum(-1)      # tr(W diag(var) W^T)
    D = x.shape[-1]
    rec = -0.5 * ((resid ** 2).sum(-1) + trace) / decoder.sigma ** 2 - 0.5 * D * (LOG_2PI + 2 * math.log(decoder.sigma))
    return rec - 0.5 * (mean ** 2 + var - 1 - logvar).sum(-1)


def repeat_rows(t, n):
    return t.repeat_interleave(n, 0)


# ----------------------------------------------------------------------------------------------
# (1) k = 1 is the ELBO.

def small_text_model():
    torch.manual_seed(0)
    decoder = common.LSTMDecoder(vocab_size=20, emb_dim=8, hidden_dim=8, latent_dim=3, dropout=0.0).double().eval()
    for p in decoder.parameters():                  # larger weights than the init, so z matters
        torch.nn.init.uniform_(p, -0.5, 0.5)
    x = torch.cat([torch.zeros(4, 1, dtype=torch.long), torch.randint(3, 20, (4, 6))], 1)
    mean = torch.randn(4, 3, dtype=torch.float64)
    logvar = torch.randn(4, 3, dtype=torch.float64) * 0.5
    return decoder, x, mean, logvar


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_k1_is_the_single_sample_elbo_on_the_same_z(kl_weight):
    decoder, x, mean, logvar = small_text_model()
    eps = torch.randn(4, 1, 3, dtype=torch.float64)
    z = mean.unsqueeze(1) + (0.5 * logvar).exp().unsqueeze(1) * eps
    bound, objective = iwae_bound(decoder, PRIOR, x, z, mean, logvar, kl_weight)
    log_px_z = decoder.log_prob(x, z)[:, 0]
    log_pz = -0.5 * (LOG_2PI + z[:, 0] ** 2).sum(-1)              # written out, not common's helpers
    log_qz = -0.5 * (LOG_2PI + logvar + eps[:, 0] ** 2).sum(-1)
    torch.testing.assert_close(bound, log_px_z + log_pz - log_qz, rtol=0, atol=1e-12)
    torch.testing.assert_close(objective, log_px_z + kl_weight * (log_pz - log_qz), rtol=0, atol=1e-12)
    if kl_weight == 1:
        assert torch.equal(bound, objective)


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_k1_is_the_vae_loss_in_expectation(kl_weight):
    """vae.py: loss = -log p(x|z) + kl_weight * KL (closed form). iwae with k = 1 estimates KL by
    log q - log p(z) on the sample; over many samples the two agree within Monte Carlo error."""
    decoder, x, mean, logvar = small_text_model()
    S = 5000
    z = common.reparameterize(repeat_rows(mean, S), repeat_rows(logvar, S))     # [4 S, 1, d]
    xs, means, logvars = repeat_rows(x, S), repeat_rows(mean, S), repeat_rows(logvar, S)
    with torch.no_grad():
        _, objective = iwae_bound(decoder, PRIOR, xs, z, means, logvars, kl_weight)
        vae_objective = decoder.log_prob(xs, z)[:, 0] - kl_weight * PRIOR.kl(means, logvars)
    diff = (objective - vae_objective).view(4, S)                # same z: only the KL estimate differs
    se = diff.std(1) / math.sqrt(S)
    assert (se > 0).all()
    assert (diff.mean(1).abs() < 4 * se).all(), (diff.mean(1), se)


# ----------------------------------------------------------------------------------------------
# (2) On a linear-Gaussian model, L_k rises with k towards log p(x).

def linear_gaussian_problem():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 2, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    decoder = LinearGaussianDecoder(W, b, sigma=0.5)
    x = torch.randn(3, 3, generator=g, dtype=torch.float64) * 2 + b
    post_mean, post_cov = decoder.posterior(x)
    # q is diagonal (the posterior is not), shifted off the posterior mean and too wide
    mean = post_mean + 0.5
    logvar = (2 * post_cov.diagonal()).log().expand(3, -1).clone()
    return decoder, x, mean, logvar


def estimate_bound(decoder, x, mean, logvar, k, reps):
    """Mean and standard error of iwae_bound over `reps` independent draws of k samples: [batch] each."""
    n = x.shape[0]
    z = common.reparameterize(repeat_rows(mean, reps), repeat_rows(logvar, reps), k)
    bound, _ = iwae_bound(decoder, PRIOR, repeat_rows(x, reps), z, repeat_rows(mean, reps), repeat_rows(logvar, reps))
    bound = bound.view(n, reps)
    return bound.mean(1), bound.std(1) / math.sqrt(reps)


def test_bound_rises_with_k_towards_log_px():
    torch.manual_seed(2)
    decoder, x, mean, logvar = linear_gaussian_problem()
    log_px = decoder.log_marginal(x)
    ks = [1, 2, 5, 20, 100]
    est = {k: estimate_bound(decoder, x, mean, logvar, k, reps=400000 // k) for k in ks}
    # k = 1: the ELBO, which here has a closed form
    elbo = elbo_closed_form(decoder, x, mean, logvar)
    assert ((est[1][0] - elbo).abs() < 4 * est[1][1]).all(), (est[1][0], elbo, est[1][1])
    assert (log_px - elbo > 1.0).all()                  # q is poor enough for the test to mean something
    for small, large in zip(ks, ks[1:]):
        gap = est[large][0] - est[small][0]
        se = (est[large][1] ** 2 + est[small][1] ** 2).sqrt()
        assert (gap > 4 * se).all(), (small, large, gap, se)          # strictly rises
    for k in ks:
        assert (est[k][0] < log_px + 4 * est[k][1]).all(), (k, est[k][0], log_px)   # stays a lower bound
    # and closes most of the gap: at k = 100 less than a tenth of the ELBO's gap remains
    assert ((log_px - est[100][0]) < 0.1 * (log_px - elbo)).all(), (log_px, est[100][0], elbo)


# ----------------------------------------------------------------------------------------------
# (3) The gradient iwae.py trains with is an unbiased estimate of grad L_k.

def exact_bound_1d(x, mean, logvar, W, b, sigma, k, nodes=60):
    """L_k for a scalar latent by Gauss-Hermite quadrature over the k samples (k-dimensional), written
    independently of iwae.py: deterministic, so its finite differences are the exact gradient."""
    t, weights = np.polynomial.hermite.hermgauss(nodes)
    t, weights = torch.tensor(t, dtype=torch.float64), torch.tensor(weights / math.sqrt(math.pi), dtype=torch.float64)
    z = mean + math.exp(0.5 * logvar) * math.sqrt(2) * t                 # nodes of q = N(mean, exp(logvar))
    log_lik = -0.5 * (((x - z[:, None] * W - b) / sigma) ** 2 + LOG_2PI + 2 * math.log(sigma)).sum(-1)
    log_w = log_lik - 0.5 * z ** 2 + 0.5 * (logvar + math.sqrt(2) ** 2 * t ** 2)   # + log p(z) - log q(z)
    total, weight = log_w, weights                                       # sum over a k-dimensional grid
    for _ in range(k - 1):
        total = torch.logaddexp(total.unsqueeze(-1), log_w)
        weight = weight.unsqueeze(-1) * weights
    return ((total - math.log(k)) * weight).sum()


def test_gradient_is_unbiased_for_grad_of_bound():
    torch.manual_seed(3)
    k, sigma = 3, 0.6
    W = torch.tensor([1.5, -0.8], dtype=torch.float64)
    b = torch.tensor([0.2, -0.1], dtype=torch.float64)
    x = torch.tensor([1.1, -0.9], dtype=torch.float64)
    precision = 1 + (W ** 2).sum() / sigma ** 2
    post_mean = float((W * (x - b)).sum() / sigma ** 2 / precision)
    params = {"mean": post_mean + 0.5, "logvar": math.log(0.36), "b0": 0.2, "b1": -0.1}   # q: off and too wide

    def exact(p, nodes=60):
        bias = torch.tensor([p["b0"], p["b1"]], dtype=torch.float64)
        return exact_bound_1d(x, p["mean"], p["logvar"], W, bias, sigma, k, nodes)

    # 60 nodes per sample: within 1e-5 of a 120-node rule, far below the Monte Carlo error below
    assert abs(exact(params, 60).item() - exact(params, 120).item()) < 1e-5
    # exact gradient: central differences of the deterministic quadrature
    h, exact_grad = 1e-5, {}
    for name in params:
        up, down = dict(params), dict(params)
        up[name] += h
        down[name] -= h
        exact_grad[name] = (exact(up) - exact(down)).item() / (2 * h)

    # iwae.py's estimate: autograd through iwae_bound on R independent draws, one copy of the
    # parameters per draw, so each draw's gradient lands in its own row
    R = 200000
    mean = torch.full((R, 1), params["mean"], dtype=torch.float64, requires_grad=True)
    logvar = torch.full((R, 1), params["logvar"], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([params["b0"], params["b1"]], dtype=torch.float64).repeat(R, 1, 1).requires_grad_()
    decoder = LinearGaussianDecoder(W.view(2, 1), bias, sigma)
    z = common.reparameterize(mean, logvar, k)
    bound, _ = iwae_bound(decoder, PRIOR, x.expand(R, -1), z, mean, logvar)
    bound.sum().backward()
    value_se = bound.std().item() / math.sqrt(R)
    assert abs(bound.mean().item() - exact(params).item()) < 4 * value_se
    grads = {"mean": mean.grad[:, 0], "logvar": logvar.grad[:, 0], "b0": bias.grad[:, 0, 0], "b1": bias.grad[:, 0, 1]}
    for name, g in grads.items():
        se = g.std().item() / math.sqrt(R)
        assert abs(g.mean().item() - exact_grad[name]) < 4 * se, (name, g.mean().item(), exact_grad[name], se)
    # the check has power: grad L_k differs from grad ELBO (the k = 1 bound) by many standard errors
    elbo_grad_mean = (exact_bound_1d(x, params["mean"] + h, params["logvar"], W, b, sigma, 1)
                      - exact_bound_1d(x, params["mean"] - h, params["logvar"], W, b, sigma, 1)).item() / (2 * h)
    assert abs(elbo_grad_mean - exact_grad["mean"]) > 20 * grads["mean"].std().item() / math.sqrt(R)


# ----------------------------------------------------------------------------------------------
# (4) The script through its command line.

SMOKE = ["--train_size", "64", "--epochs", "1", "--iw_samples", "5", "--val_iw_samples", "2", "--k", "3"]


def check_run(save_dir, dataset, num_examples, text):
    metrics = read_metrics(save_dir)                 # also checks the keys
    assert metrics["method"] == "iwae" and metrics["dataset"] == dataset
    assert metrics["iw_samples"] == 5 and metrics["num_examples"] == num_examples
    for key in ("nll", "neg_elbo", "rec", "kl", "mi", "train_seconds"):
        assert math.isfinite(metrics[key]), key
    assert metrics["nll"] > 0 and metrics["kl"] >= 0 and isinstance(metrics["au"], int)
    assert (metrics["ppl"] is not None) == text
    log = [json.loads(line) for line in (save_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and math.isfinite(log[0]["train"]["neg_bound"])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke runs, two at a time: {dataset: (CompletedProcess, save_dir)}."""
    root = tmp_path_factory.mktemp("iwae")
    flags = {"text": ["--dataset", "text", "--data_dir", write_text_corpus(root / "corpus"), "--emb_dim", "8",
                      "--hidden_dim", "8", "--latent_dim", "2"],
             "synthetic_images": ["--dataset", "synthetic_images", "--image_net", "mlp"]}
    procs = run_scripts({name: [("iwae.py", *SMOKE, *extra, "--save_dir", root / name)]
                         for name, extra in flags.items()})
    return {name: (procs[name], root / name) for name in flags}


def test_smoke_text(smoke):
    proc, save_dir = smoke["text"]
    succeeded({"text": proc})
    check_run(save_dir, "text", 10, text=True)


def test_smoke_images(smoke):
    """The same script on images (Burda et al.'s MLPs, Bernoulli pixels): no path specific to text."""
    proc, save_dir = smoke["synthetic_images"]
    succeeded({"synthetic_images": proc})
    check_run(save_dir, "synthetic_images", 100, text=False)


def test_bad_k_is_one_clear_line(tmp_path):
    proc = run_script("iwae.py", "--k", "0", "--save_dir", tmp_path, check=False)
    assert proc.returncode != 0
    assert "error: --k must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
