"""Variational inference for Monte Carlo objectives (VIMCO): the k-sample bound of iwae.py for binary latents,
where the reparameterisation trick does not apply. The decoder and the prior are trained by backpropagation
through L_k = log (1/k) sum_j p(x, h_j) / q(h_j|x); the encoder by the score function, each sample's learning
signal being L_k minus L_k with that sample's term replaced by the geometric mean of the others.

Mnih & Rezende, "Variational inference for Monte Carlo objectives", ICML 2016, Sec. 3 (the gradient split into a
score-function term and a weighted term; the leave-one-out learning signals with the geometric mean). The paper's
text could not be read here: its equation numbers are not cited, and the lines follow the method as summarised.
Burda et al.'s MLPs (784-200-200-d, tanh) over d = 200 binary units with a factorised Bernoulli prior.
Reproduce: python vimco.py --k 5                              (synthetic_images)
           python vimco.py --dataset omniglot --k 50 --cuda
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import analysis
import common
import data

parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
common.add_shared_args(parser)
parser.set_defaults(dataset="synthetic_images", image_net="mlp", latent_dim=200)
method = parser.add_argument_group("method")
method.add_argument("--k", type=int, default=5,
                    help="samples per example in training (at least 2: each sample's baseline is built from the others)")
args = common.parse_args(parser, __file__)
if args.k < 2 or args.dataset not in common.IMAGE_DATASETS or args.image_net != "mlp" or args.latent_dim < 1 \
        or args.kl_start != 1 or args.gaps or args.plot_posterior:
    common.fail("vimco.py needs --k >= 2, binary images (it is for images: omniglot, synthetic_images) with --image_net "
                "mlp, --latent_dim >= 1, no KL annealing (--kl_start 1), and no --gaps or --plot_posterior (Gaussian q's)")

class Bernoulli:
    """q(h|x) = prod_u Bernoulli(h_u; sigmoid(logits_u)) for binary latents h in {0, 1}^d, with common.Gaussian's members
    (mean: the probabilities). Samples are not reparameterised: log q(h|x) carries the gradient."""

    def __init__(self, logits):
        self.logits, self.mean = logits, torch.sigmoid(logits)

    def sample(self, n, generator=None):
        u = torch.rand((*self.mean.shape[:-1], n, self.mean.shape[-1]), generator=generator, device=self.mean.device)
        h = (u < self.mean.detach().unsqueeze(-2)).to(self.mean.dtype)
        return h, Bernoulli(self.logits.unsqueeze(-2)).log_prob(h)

    def log_prob(self, h):                         # log sigmoid(l) if h = 1, log sigmoid(-l) if 0: h l - log(1 + e^l)
        return (h * self.logits - F.softplus(self.logits)).sum(-1)

    def entropy(self):
        return (F.softplus(self.logits) - self.logits * self.mean).sum(-1)

    def kl(self, prior):
        return prior.kl(self.logits)


class BernoulliPrior(nn.Module):
    """p(h) = prod_u Bernoulli(h_u; sigmoid(a_u)), a learned (the top layer of a sigmoid belief network)."""

    def __init__(self, latent_dim):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(latent_dim))

    def log_prob(self, h):
        return Bernoulli(self.logits).log_prob(h)

    def sample(self, n, generator):
        return (torch.rand(n, len(self.logits), generator=generator, device=generator.device)
                < torch.sigmoid(self.logits)).float()

    def kl(self, logits):
        """KL(q || p) in closed form for q = Bernoulli(sigmoid(logits)), summed over the units:
        sum_u q_u (log q_u - log p_u) + (1 - q_u) (log (1 - q_u) - log (1 - p_u))."""
        q = torch.sigmoid(logits)
        return (q * (F.logsigmoid(logits) - F.logsigmoid(self.logits))
                + (1 - q) * (F.logsigmoid(-logits) - F.logsigmoid(-self.logits))).sum(-1)


dataset = data.load(args)
_, decoder, _ = common.build_model(args, dataset)          # Burda et al.'s MLP decoder, d-200-200-784
encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, args.hidden_dim), nn.Tanh(), nn.Linear(args.hidden_dim, args.hidden_dim),
                        nn.Tanh(), nn.Linear(args.hidden_dim, args.latent_dim)).to(args.device)   # q's logits
prior = BernoulliPrior(args.latent_dim).to(args.device)
modules = {"encoder": encoder, "decoder": decoder, "prior": prior}
optimizer = common.make_optimizer([*encoder.parameters(), *decoder.parameters(), *prior.parameters()], args)
optimizers = {"optimizer": optimizer}


def infer(x):
    """q(h|x): independent Bernoulli units, their logits from one encoder pass."""
    return Bernoulli(encoder(x))


def vimco_bound(decoder, prior, x, q, k):
    """From k samples h [batch, k, d] of q, per example [batch]: the bound L_k, and a surrogate whose gradient is
    VIMCO's estimator of the gradient of E L_k (the surrogate's value means nothing)."""
    h, log_q = q.sample(k)                                   # binary: no path from h back to the encoder
    log_f = decoder.log_prob(x, h) + prior.log_prob(h) - log_q          # log f(x, h_j) = log p(x, h_j) / q(h_j|x)
    # L_k; its gradient through log f is the weighted term, sum_j w_j d log f(x, h_j), w_j = f_j / sum_i f_i
    bound = torch.logsumexp(log_f, 1) - math.log(k)
    # sample j's learning signal: L_k minus L_k with f(x, h_j) replaced by the geometric mean of the other k - 1,
    # exp(mean_{i != j} log f(x, h_i)) (row j of `left_out`); a constant, which is what makes it a baseline
    others = (log_f.sum(1, keepdim=True) - log_f) / (k - 1)                       # [batch, k]
    left_out = log_f.unsqueeze(1) + torch.diag_embed(others - log_f)              # [batch, j, i]
    signal = (bound.unsqueeze(1) - torch.logsumexp(left_out, 2) + math.log(k)).detach()
    return bound, bound + (signal * log_q).sum(1)            # + the score-function term, sum_j signal_j d log q(h_j|x)


def train_step(x, kl_weight):
    q = infer(x)                                             # once per example, not once per sample
    bound, surrogate = vimco_bound(decoder, prior, x, q, args.k)
    kl = q.kl(prior)                                         # closed form, logged beside the bound
    loss = -surrogate.mean()                                 # its gradient: minus VIMCO's estimate of grad L_k
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    common.clip_grad(modules.values(), args.clip)
    optimizer.step()
    return bound.detach(), kl.detach()


state = common.start(args, dataset, modules, optimizers)
for epoch in common.epochs(args, state):
    encoder.train(), decoder.train()
    meter = common.Meter(args, epoch, dataset.steps_per_epoch(args.batch_size))
    for x in dataset.batches("train", args.batch_size, shuffle=True):
        analysis.plot_posterior(args, state["step"], infer, decoder, prior, dataset)
        kl_weight = common.kl_weight(args, state["step"], dataset.steps_per_epoch(args.batch_size))
        bound, kl = train_step(x, kl_weight)
        state["step"] += 1
        meter.add(kl_weight, neg_bound=-bound, kl=kl)        # -L_k: the training log's "neg_bound"
    encoder.eval(), decoder.eval()
    val = common.evaluate(infer, decoder, prior, dataset.batches("valid", args.batch_size), args.val_iw_samples)
    common.end_epoch(args, state, meter, val, dataset=dataset, modules=modules, optimizers=optimizers)
common.final_test(args, state, infer, dataset, modules)
analysis.report(args, infer, dataset, modules)
