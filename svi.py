"""Stochastic variational inference: no encoder. For each batch, lambda = (mean, logvar) starts at zero
and takes --svi_steps steps of SGD with momentum on the -ELBO with the decoder fixed; then the decoder
takes one step on the -ELBO at the refined lambda (held constant). Evaluation refines the same way, from zero.

Hoffman, Blei, Wang & Paisley, "Stochastic Variational Inference", JMLR 2013, as run by Kim et al.,
"Semi-Amortized Variational Autoencoders", ICML 2018 (the SVI rows of their tables; SVI steps as in their Alg. 2).
Reproduce: python svi.py --dataset yahoo --cuda                 (SVI, 20 steps, with annealing)
           python svi.py --dataset yahoo --svi_steps 40 --cuda  (or 10: the other SVI rows)
Per-example steps: each sentence's step uses its own -ELBO and its own clipping, so it does not depend on
the batch. Kim et al. took steps on the batch MEAN (lr 1 at batch 32), i.e. lr 1/32 per sentence: the
default --svi_lr 0.03125 (= 1/32) is their setting; their clip acted on the whole batch, ours per sentence.
"""
import argparse

import torch

import analysis
import common
import data

parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
common.add_shared_args(parser)
method = parser.add_argument_group("method")
method.add_argument("--svi_steps", type=int, default=20, help="K: SVI steps per batch (Kim et al.: 10, 20, 40)")
method.add_argument("--svi_lr", type=float, default=1 / 32,
                    help="SVI step size on each sentence's own -ELBO (Kim et al.'s lr 1 on a mean over 32 sentences)")
method.add_argument("--momentum", type=float, default=0.5, help="momentum of the SVI steps")
method.add_argument("--svi_clip", type=float, default=5.0,
                    help="clip each sentence's mean and logvar gradients (separately) to this norm (0: off)")
args = common.parse_args(parser, __file__)
if args.latent_dim < 1 or args.svi_steps < 0 or args.svi_lr <= 0 or args.svi_clip < 0 or not 0 <= args.momentum < 1:
    common.fail("svi.py needs --latent_dim >= 1, --svi_steps >= 0, --svi_lr > 0, --svi_clip >= 0, 0 <= --momentum < 1")
if args.oracle and args.epochs and not args.eval_only:
    common.fail("svi.py learns only the decoder, which --oracle fixes to the true generator: nothing to train; "
                "add --epochs 0 to score SVI's inference with the true generator")

dataset = data.load(args)
_, decoder, prior = common.build_model(args, dataset)      # no encoder (built anyway: same decoder init as vae.py)
modules = {"decoder": decoder, "prior": prior}
optimizer = common.make_optimizer(decoder.parameters(), args)
optimizers = {"optimizer": optimizer}


def svi_steps(x, mean, logvar, kl_weight):
    """K = --svi_steps steps of SGD with momentum (Kim et al. 2018, Alg. 2, F1 and F2) from lambda_0 = (mean,
    logvar), decoder fixed, each sentence's gradient clipped on its own (mean and logvar separately).
    Returns (mean_K, logvar_K), detached."""
    # a local generator, seeded from the global one (read, never reseeded): a step's noise can be replayed
    generator = torch.Generator(x.device).manual_seed(int(torch.randint(2 ** 62, ()))) if args.svi_steps else None
    lam = [mean.detach(), logvar.detach()]
    velocity = [torch.zeros_like(t) for t in lam]                                         # v_0 = 0
    with torch.enable_grad(), common.svi_mode(decoder):    # cuDNN's LSTM backward also in evaluation
        for _ in range(args.svi_steps):
            lam = [t.requires_grad_() for t in lam]
            f = common.svi_objective(decoder, prior, x, *lam, kl_weight, generator).sum()
            grads = torch.autograd.grad(f, lam)                      # lambda only: no decoder gradients
            velocity = [args.momentum * v - common.clip_rows(g, args.svi_clip) for v, g in zip(velocity, grads)]  # (F1)
            lam = [t.detach() + args.svi_lr * v for t, v in zip(lam, velocity)]                                    # (F2)
    return lam[0], lam[1]


def infer(x, kl_weight=1.0):
    """q(z|x) from K SVI steps starting at lambda_0 = 0, i.e. q = p(z) (Kim et al.'s training start;
    their evaluation started at 0.1 * randn). Enables gradients itself (evaluate runs under no_grad)."""
    zeros = torch.zeros(x.shape[0], args.latent_dim, device=x.device)
    return svi_steps(x, zeros, zeros, kl_weight)


def train_step(x, kl_weight):
    mean, logvar = infer(x, kl_weight)                       # lambda_K, a constant for the decoder step
    z = common.reparameterize(mean, logvar)                  # [batch, 1, d], one sample
    rec = -decoder.log_prob(x, z)[:, 0]                      # -log p(x|z)
    kl = prior.kl(mean, logvar)                              # closed form
    loss = (rec + kl_weight * kl).mean()                     # -ELBO at lambda_K, KL weighted while annealing
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    common.clip_grad(modules.values(), args.clip)
    optimizer.step()
    return rec.detach(), kl.detach()


state = common.start(args, dataset, modules, optimizers)
for epoch in common.epochs(args, state):
    decoder.train()
    meter = common.Meter(args, epoch, dataset.steps_per_epoch(args.batch_size))
    for x in dataset.batches("train", args.batch_size, shuffle=True):
        analysis.plot_posterior(args, state["step"], infer, decoder, prior, dataset)
        kl_weight = common.kl_weight(args, state["step"], dataset.steps_per_epoch(args.batch_size))
        rec, kl = train_step(x, kl_weight)
        state["step"] += 1
        meter.add(kl_weight, neg_elbo=rec + kl, rec=rec, kl=kl)
    decoder.eval()
    val = common.evaluate(infer, decoder, prior, dataset.batches("valid", args.batch_size), args.val_iw_samples)
    common.end_epoch(args, state, meter, val, dataset=dataset, modules=modules, optimizers=optimizers)
common.final_test(args, state, infer, dataset, modules)
analysis.report(args, infer, dataset, modules)
