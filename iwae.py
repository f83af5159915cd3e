"""Importance-weighted autoencoder: the encoder's q(z|x) proposes k samples per example, and encoder
and decoder are trained jointly on L_k = E log (1/k) sum_s p(x, z_s) / q(z_s|x), a bound on log p(x)
that is the ELBO for k = 1 and tightens as k grows (each sample weighted by its normalised weight).

Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016 (eq. 8 bound, eq. 14 gradient).
Reproduce (docs/results.md#iwae: synthetic preset, 20 epochs, default seed; compared with python vae.py):
           python iwae.py --k 5
           python iwae.py --k 20
"""
import argparse
import math

import torch

import analysis
import common
import data

parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
common.add_shared_args(parser)
method = parser.add_argument_group("method")
method.add_argument("--k", type=int, default=5,
                    help="importance samples per example in training (Burda et al.: 5, 50; 1: the ELBO)")
args = common.parse_args(parser, __file__)
if args.k < 1:
    common.fail("--k must be >= 1")

dataset = data.load(args)
encoder, decoder, prior = common.build_model(args, dataset)
modules = {"encoder": encoder, "decoder": decoder, "prior": prior}
optimizer = common.make_optimizer([*encoder.parameters(), *decoder.parameters()], args)
optimizers = {"optimizer": optimizer}


def infer(x):
    """q(z|x) in one encoder pass."""
    return encoder(x)


def iwae_bound(decoder, prior, x, z, mean, logvar, kl_weight=1.0):
    """From k samples z [batch, k, d] of q = N(mean, exp(logvar)), per example [batch]: the bound L_k,
    and the objective trained, which anneals by weighting log p(z) - log q(z|x) inside each log w_s."""
    log_px_z = decoder.log_prob(x, z)                                        # [batch, k]
    log_ratio = prior.log_prob(z) - common.log_normal(z, mean.unsqueeze(1), logvar.unsqueeze(1))
    k = z.shape[1]
    # Burda et al. eq. 8: L_k = log (1/k) sum_s w_s, log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x),
    # as logsumexp: w_s itself underflows (log w_s is tens to hundreds of nats below 0 per sentence).
    # Its autograd gradient is eq. 14, each grad log w_s weighted by w_s / sum_t w_t: nothing is detached.
    bound = torch.logsumexp(log_px_z + log_ratio, 1) - math.log(k)
    # k = 1: the annealed ELBO of vae.py in expectation. kl_weight 1 trains exactly L_k.
    if kl_weight == 1:
        return bound, bound
    return bound, torch.logsumexp(log_px_z + kl_weight * log_ratio, 1) - math.log(k)


def train_step(x, kl_weight):
    mean, logvar = encoder(x)                                # once per example, not once per sample
    z = common.reparameterize(mean, logvar, args.k)          # [batch, k, d]
    bound, objective = iwae_bound(decoder, prior, x, z, mean, logvar, kl_weight)
    kl = prior.kl(mean, logvar)                              # closed form, logged beside the bound
    loss = -objective.mean()                                 # -L_k, annealed while kl_weight < 1
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
