"""Semi-amortized variational inference: the encoder gives lambda_0 = (mean, logvar), --svi_steps steps of
SGD with momentum on the -ELBO refine it to lambda_K, and the -ELBO at lambda_K is backpropagated through
the K steps: the decoder gets its total derivative and the encoder dL/dlambda_0 (Hessian-vector products).

Kim, Wiseman, Miller, Sontag & Rush, "Semi-Amortized Variational Autoencoders", ICML 2018, Algorithm 2
(its lines are labelled F1-F2 and B1-B4 below).
Reproduce: python savae.py --dataset yahoo --cuda                       (SA-VAE, K = 20, with annealing)
           python savae.py --dataset yahoo --variant vae+svi --cuda     (and vae+svi+kl: their ablations)
           python savae.py --dataset yahoo --kl_start 1 --cuda         (standard ELBO; He et al. Table 1)
           python savae.py --svi_steps 0                              (exactly vae.py)
Per-example steps: each sentence's step uses its own -ELBO and its own clipping, so it does not depend on
the batch. Kim et al. took steps on the batch MEAN (lr 1 at batch 32), i.e. lr 1/32 per sentence: the
default --svi_lr 0.03125 (= 1/32) is their setting; their clip acted on the whole batch, ours per sentence.
The gradient is that of autograd through the K clipped steps (checked in float32 and float64 by the tests).
Kim et al.'s code used one-sided finite differences (r = 1e-5) and clipped the batch's adjoint to norm 5 at
every step; neither is the gradient (60-95% off in float32), so that mode is not offered.
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
method.add_argument("--variant", default="savae", choices=["savae", "vae+svi", "vae+svi+kl"],
                    help="savae: encoder trained through the K steps; vae+svi: encoder on the ELBO at lambda_0; "
                         "vae+svi+kl: encoder on KL(q(lambda_0) || q(lambda_K)). The decoder always at lambda_K")
method.add_argument("--hvp", default="central", choices=["central", "exact"],
                    help="Hessian-vector products of the backward loop: central differences with a step scaled "
                         "to each sentence's vector (any LSTM, cuDNN included; error about 1e-4 in float32) or "
                         "exact double backward (cuDNN's LSTM has none: switched off for these products)")
args = common.parse_args(parser, __file__)
if args.latent_dim < 1 or args.svi_steps < 0 or args.svi_lr <= 0 or args.svi_clip < 0 or not 0 <= args.momentum < 1:
    common.fail("savae.py needs --latent_dim >= 1, --svi_steps >= 0, --svi_lr > 0, --svi_clip >= 0, 0 <= --momentum < 1")

dataset = data.load(args)
encoder, decoder, prior = common.build_model(args, dataset)
modules = {"encoder": encoder, "decoder": decoder, "prior": prior}
optimizer = common.make_optimizer([*encoder.parameters(), *decoder.parameters()], args)
optimizers = {"optimizer": optimizer}


def svi_steps(x, mean, logvar, kl_weight, trace=None):
    """K = --svi_steps steps of SGD with momentum (Kim et al. 2018, Alg. 2, F1 and F2) from lambda_0 = (mean,
    logvar), decoder fixed, each sentence's gradient clipped on its own (mean and logvar separately).
    Returns (mean_K, logvar_K), detached. With a list `trace`, each step appends what the backward loop needs:
    lambda_k, its gradient, and the generator's state before the step (to replay its eps and dropout masks)."""
    # a local generator, seeded from the global one (read, never reseeded): a step's noise can be replayed
    generator = torch.Generator(x.device).manual_seed(int(torch.randint(2 ** 62, ()))) if args.svi_steps else None
    lam = [mean.detach(), logvar.detach()]
    velocity = [torch.zeros_like(t) for t in lam]                                         # v_0 = 0
    with torch.enable_grad(), common.svi_mode(decoder):    # cuDNN's LSTM backward also in evaluation
        for _ in range(args.svi_steps):
            lam = [t.requires_grad_() for t in lam]
            rng = generator.get_state()
            f = common.svi_objective(decoder, prior, x, *lam, kl_weight, generator).sum()
            grads = torch.autograd.grad(f, lam)                      # lambda only: no decoder gradients
            if trace is not None:
                trace.append(([t.detach() for t in lam], grads, rng))
            velocity = [args.momentum * v - common.clip_rows(g, args.svi_clip) for v, g in zip(velocity, grads)]  # (F1)
            lam = [t.detach() + args.svi_lr * v for t, v in zip(lam, velocity)]                                    # (F2)
    return lam[0], lam[1]


def clip_rows_vjp(g, v, max_norm):
    """v backpropagated through common.clip_rows at g. Its Jacobian is symmetric: the identity for rows
    within max_norm, (max_norm / |g|) (I - n n^T) with n = g / |g| for clipped rows."""
    if max_norm <= 0:
        return v
    norm = g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    n = g / norm
    return torch.where(norm > max_norm, (max_norm / norm) * (v - n * (n * v).sum(-1, keepdim=True)), v)


def hessian_vector(x, kl_weight, lam_k, rng, u):
    """(H_{lambda,lambda} f u, H_{theta,lambda} f u) at lambda_k, replaying step k's eps and dropout masks (the
    generator's state `rng` before the step). exact: double backward, with cuDNN off (its LSTM has none).
    central: (grad f(lambda + r u) - grad f(lambda - r u)) / 2r with a step r_i = h / |u_i| for each sentence
    (h = 2^-8 in float32, 2^-17 in float64: truncation and rounding errors about equal), each point scored with
    step k's noise. The decoder's gradient sums over sentences, so f is weighted by +-1 / r_i instead of
    subtracting and dividing afterwards."""
    params = [p for p in decoder.parameters() if p.requires_grad]       # not --oracle's frozen generator
    generator = torch.Generator(device=x.device)
    if args.hvp == "exact":
        generator.set_state(rng)
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
            lam = [t.clone().requires_grad_() for t in lam_k]
            f = common.svi_objective(decoder, prior, x, *lam, kl_weight, generator).sum()
            grads = torch.autograd.grad(f, lam, create_graph=True)
            hv = torch.autograd.grad(grads, lam + params, grad_outputs=u, allow_unused=True)
        hv = [torch.zeros_like(t) if h is None else h for h, t in zip(hv, lam + params)]
        return hv[:2], hv[2:]
    h = 2.0 ** -8 if lam_k[0].dtype != torch.float64 else 2.0 ** -17
    size = torch.cat(u, -1).norm(dim=-1, keepdim=True).clamp_min(1e-30)           # |u_i|: [batch, 1]
    with torch.enable_grad():
        points, weighted = [], 0
        for sign in (1, -1):                                 # lambda + r u, then lambda - r u
            generator.set_state(rng)
            points += [(t + sign * (h / size) * v).requires_grad_() for t, v in zip(lam_k, u)]
            f = common.svi_objective(decoder, prior, x, *points[-2:], kl_weight, generator)
            weighted = weighted + (f * sign * size[:, 0] / h).sum()
        grads = torch.autograd.grad(weighted, points + params)
    return [(plus + minus) / 2 for plus, minus in zip(grads[:2], grads[2:4])], [g / 2 for g in grads[4:]]


def svi_backward(x, kl_weight, trace, lam_bar):
    """The backward loop (B1-B4) through the recorded steps. lam_bar: lambda-bar_K, the gradient of the
    batch-mean loss L = mean_i f_i(lambda_K) with respect to (mean_K, logvar_K). Adds the terms through the
    steps, -sum_k H_{theta,lambda} v-bar_{k+1} (B3), to the decoder's .grad, which holds the direct term
    grad_theta L, and returns lambda-bar_0 for the encoder."""
    params = [p for p in decoder.parameters() if p.requires_grad]
    v_bar = [torch.zeros_like(t) for t in lam_bar]                                        # v-bar_K = 0
    theta_bar = [torch.zeros_like(p) for p in params]
    for lam_k, grads_k, rng in reversed(trace):
        v_bar = [v + args.svi_lr * l for v, l in zip(v_bar, lam_bar)]                     # (B1)
        # (F1) used clip(grad f(lambda_k)): the adjoint passes through the clip before the Hessian
        u = [clip_rows_vjp(g, v, args.svi_clip) for g, v in zip(grads_k, v_bar)]
        h_lam, h_theta = hessian_vector(x, kl_weight, lam_k, rng, u)
        lam_bar = [l - h for l, h in zip(lam_bar, h_lam)]                                 # (B2)
        for total, h in zip(theta_bar, h_theta):
            total.sub_(h)                                                                 # (B3)
        v_bar = [args.momentum * v for v in v_bar]                                        # (B4)
    for p, total in zip(params, theta_bar):
        p.grad = total if p.grad is None else p.grad.add_(total)
    return lam_bar


def infer(x):
    """q(z|x): the encoder's lambda_0, refined by K SVI steps (which enable gradients themselves)."""
    return svi_steps(x, *encoder(x), 1.0)


def train_step(x, kl_weight):
    mean0, logvar0 = encoder(x)                              # lambda_0 = enc(x; phi)      (Kim et al. 2018, Alg. 2)
    trace = [] if args.variant == "savae" else None          # the steps, kept for the backward loop
    mean, logvar = svi_steps(x, mean0, logvar0, kl_weight, trace)                     # (F1, F2)
    mean.requires_grad_(), logvar.requires_grad_()           # lambda_K, a leaf: backward() leaves lambda-bar_K in .grad
    z = common.reparameterize(mean, logvar)                  # [batch, 1, d], one sample
    rec = -decoder.log_prob(x, z)[:, 0]                      # -log p(x|z)
    kl = prior.kl(mean, logvar)                              # closed form
    loss = (rec + kl_weight * kl).mean()                     # L = f(lambda_K), KL weighted while annealing
    optimizer.zero_grad(set_to_none=True)
    loss.backward()                                          # theta-bar = grad_theta L, and lambda-bar_K
    if args.variant == "savae":                              # (B1-B4): the decoder's total derivative, lambda-bar_0
        grads = svi_backward(x, kl_weight, trace, [mean.grad, logvar.grad])
    elif args.variant == "vae+svi":                          # encoder: the ordinary ELBO at lambda_0 (not decoder)
        z0 = common.reparameterize(mean0, logvar0)
        loss0 = (-decoder.log_prob(x, z0)[:, 0] + kl_weight * prior.kl(mean0, logvar0)).mean()
        grads = torch.autograd.grad(loss0, [mean0, logvar0])
    else:                                                    # encoder: KL(q(lambda_0) || q(lambda_K)), lambda_K fixed
        kl0 = 0.5 * (logvar - logvar0 + (logvar0.exp() + (mean0 - mean).pow(2)) / logvar.exp() - 1).sum(-1)
        grads = torch.autograd.grad(kl0.mean(), [mean0, logvar0])
    torch.autograd.backward([mean0, logvar0], grads)         # dL/dphi = (d lambda_0 / d phi)^T lambda-bar_0
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
