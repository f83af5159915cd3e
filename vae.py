"""Amortized variational inference: a VAE whose encoder predicts q(z|x) = N(mean, diag(exp(logvar)))
in one pass, trained jointly with the decoder on the ELBO, with the KL term annealed from --kl_start to 1.
--latent_dim 0 trains the autoregressive LSTM language model, whose NLL is exact.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014; text setting of Kim et al. 2018 and
He et al. 2019 (the VAE rows of their tables).
Reproduce: python vae.py --dataset yahoo --cuda            (VAE + annealing)
           python vae.py --dataset yahoo --kl_start 1 --cuda (standard ELBO; He et al. Table 1)
           python vae.py --dataset yahoo --latent_dim 0 --cuda (LSTM-LM)
"""
import argparse

import analysis
import common
import data

parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
common.add_shared_args(parser)
args = common.parse_args(parser, __file__)

dataset = data.load(args)
encoder, decoder, prior = common.build_model(args, dataset)
modules = {"encoder": encoder, "decoder": decoder, "prior": prior}
optimizer = common.make_optimizer([*encoder.parameters(), *decoder.parameters()], args)
optimizers = {"optimizer": optimizer}


def infer(x):
    """q(z|x) in one encoder pass."""
    return encoder(x)


def train_step(x, kl_weight):
    mean, logvar = encoder(x)
    z = common.reparameterize(mean, logvar)                  # [batch, 1, d], one sample
    rec = -decoder.log_prob(x, z)[:, 0]                      # -log p(x|z)
    kl = prior.kl(mean, logvar)                              # closed form
    loss = (rec + kl_weight * kl).mean()                     # -ELBO, KL weighted while annealing
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    common.clip_grad(modules.values(), args.clip)
    optimizer.step()
    return rec.detach(), kl.detach()


state = common.start(args, dataset, modules, optimizers)
for epoch in common.epochs(args, state):
    encoder.train(), decoder.train()
    meter = common.Meter(args, epoch, dataset.steps_per_epoch(args.batch_size))
    for x in dataset.batches("train", args.batch_size, shuffle=True):
        analysis.plot_posterior(args, state["step"], infer, decoder, prior, dataset)
        kl_weight = common.kl_weight(args, state["step"], dataset.steps_per_epoch(args.batch_size))
        rec, kl = train_step(x, kl_weight)
        state["step"] += 1
        meter.add(kl_weight, neg_elbo=rec + kl, rec=rec, kl=kl)
    encoder.eval(), decoder.eval()
    val = common.evaluate(infer, decoder, prior, dataset.batches("valid", args.batch_size), args.val_iw_samples)
    common.end_epoch(args, state, meter, val, dataset=dataset, modules=modules, optimizers=optimizers)
common.final_test(args, state, infer, dataset, modules)
analysis.report(args, infer, dataset, modules)
