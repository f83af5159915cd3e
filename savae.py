"""Semi-amortized variational inference: the encoder gives lambda_0 = (mean, logvar), --svi_steps steps of
SGD with momentum on the -ELBO refine it to lambda_K, and the -ELBO at lambda_K is backpropagated through
the K steps: the decoder gets its total derivative and the encoder dL/dlambda_0 (Hessian-vector products).

Kim, Wiseman, Miller, Sontag & Rush, "Semi-Amortized Variational Autoencoders", ICML 2018, Algorithm 2
(its lines are labelled F1-F2, B1-B4 in common.py's "SVI refinement" section and in the comments below).
Reproduce: python savae.py --dataset yahoo --cuda                       (SA-VAE, K = 20, with annealing)
           python savae.py --dataset yahoo --variant vae+svi --cuda     (and vae+svi+kl: their ablations)
           python savae.py --dataset yahoo --kl_start 1 --cuda         (standard ELBO; He et al. Table 1)
           python savae.py --svi_steps 0                              (exactly vae.py)
Per-example steps: each sentence's step uses its own -ELBO and its own clipping, so it does not depend on
the batch. Kim et al. took steps on the batch MEAN (lr 1 at batch 32), i.e. lr 1/32 per sentence: the
default --svi_lr 0.03125 (= 1/32) is their setting; their clip acted on the whole batch, ours per sentence.
"""
import argparse

import torch

import common
import data

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
common.add_shared_args(parser)
method = parser.add_argument_group("method")
method.add_argument("--svi_steps", type=int, default=20, help="K: SVI steps per batch (Kim et al.: 10, 20, 40)")
method.add_argument("--svi_lr", type=float, default=1 / 32,
                    help="SVI step size on each sentence's own -ELBO (Kim et al.'s lr 1 on a mean over 32 sentences)")
method.add_argument("--momentum", type=float, default=0.5, help="momentum of the SVI steps")
method.add_argument("--svi_clip", type=float, default=5.0,
                    help="clip each sentence's mean and logvar gradients (separately) to this norm (0: off)")
method.add_argument("--variant", default="savae", choices=["savae", "vae+svi", "vae+svi+kl"],
                    help="savae: encoder trained through the K steps; vae+svi: encoder on the ELBO at lambda_0; "
                         "vae+svi+kl: encoder on KL(q(lambda_0) || q(lambda_K)). The decoder always at lambda_K")
method.add_argument("--hvp", default="finite_diff", choices=["finite_diff", "exact"],
                    help="Hessian-vector products of the backward pass: finite differences as in Kim et al. "
                         "(any LSTM) or exact double backward (cuDNN switched off for it)")
args = common.parse_args(parser, "savae")
if args.latent_dim < 1 or args.svi_steps < 0:
    common.fail("savae.py needs --latent_dim >= 1 and --svi_steps >= 0")

dataset = data.load(args)
encoder, decoder = common.build_model(args, dataset)
modules = {"encoder": encoder, "decoder": decoder}
optimizer = common.make_optimizer([*encoder.parameters(), *decoder.parameters()], args)
optimizers = {"optimizer": optimizer}


def infer(x):
    """q(z|x): the encoder's lambda_0, refined by K SVI steps (which enable gradients themselves)."""
    mean, logvar, _ = common.svi_steps(decoder, x, *encoder(x), 1.0, args)
    return mean, logvar


def train_step(x, kl_weight):
    mean0, logvar0 = encoder(x)                              # lambda_0 = enc(x; phi)      (Kim et al. 2018, Alg. 2)
    record = args.hvp if args.variant == "savae" else None   # keep the steps for the backward loop
    mean, logvar, trace = common.svi_steps(decoder, x, mean0, logvar0, kl_weight, args, record)  # (F1, F2)
    mean.requires_grad_(), logvar.requires_grad_()           # lambda_K, a leaf: backward() leaves lambda-bar_K in .grad
    z = common.reparameterize(mean, logvar)                  # [batch, 1, d], one sample
    rec = -decoder.log_prob(x, z)[:, 0]                      # -log p(x|z)
    kl = common.kl_normal(mean, logvar)                      # closed form
    loss = (rec + kl_weight * kl).mean()                     # L = f(lambda_K), KL weighted while annealing
    optimizer.zero_grad(set_to_none=True)
    loss.backward()                                          # theta-bar = grad_theta L, and lambda-bar_K
    if args.variant == "savae":                              # (B1-B4): the decoder's total derivative, lambda-bar_0
        grads = common.svi_backward(trace, mean.grad, logvar.grad, args)
    elif args.variant == "vae+svi":                          # encoder: the ordinary ELBO at lambda_0 (not decoder)
        z0 = common.reparameterize(mean0, logvar0)
        loss0 = (-decoder.log_prob(x, z0)[:, 0] + kl_weight * common.kl_normal(mean0, logvar0)).mean()
        grads = torch.autograd.grad(loss0, [mean0, logvar0])
    else:                                                    # encoder: KL(q(lambda_0) || q(lambda_K)), lambda_K fixed
        kl0 = 0.5 * (logvar - logvar0 + (logvar0.exp() + (mean0 - mean).pow(2)) / logvar.exp() - 1).sum(-1)
        grads = torch.autograd.grad(kl0.mean(), [mean0, logvar0])
    torch.autograd.backward([mean0, logvar0], grads)         # dL/dphi = (d lambda_0 / d phi)^T lambda-bar_0
    common.clip_grad(modules.values(), args.clip)
    optimizer.step()
    return rec.detach(), kl.detach()


state = common.start(args, dataset, modules, optimizers)
for epoch in range(state["epoch"] + 1, 0 if args.eval_only else args.epochs + 1):
    encoder.train(), decoder.train()
    meter = common.Meter(args, epoch)
    for x in dataset.batches("train", args.batch_size, shuffle=True):
        common.plot_posterior(args, state["step"], infer, decoder, dataset)
        kl_weight = common.kl_weight(args, state["step"], dataset.steps_per_epoch(args.batch_size))
        rec, kl = train_step(x, kl_weight)
        state["step"] += 1
        meter.add(rec, kl, kl_weight)
    encoder.eval(), decoder.eval()
    val = common.evaluate(infer, decoder, dataset.batches("valid", args.batch_size), args.val_iw_samples)
    if common.end_epoch(args, state, epoch, meter, val, dataset, modules, optimizers):
        break
common.final_test(args, state, infer, decoder, dataset, modules)
