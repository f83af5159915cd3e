"""Aggressive inference-network training: the VAE's model and ELBO, but while aggressive, each batch
first gets encoder-only steps on fresh minibatches until their loss stops falling, then one
decoder-only step; aggressive mode ends after the first epoch whose validation MI stops climbing.

He, Spokoyny, Neubig, Berg-Kirkpatrick, "Lagging Inference Networks and Posterior Collapse in
Variational Autoencoders", ICLR 2019 (Algorithm 1, Sec. 3).
Reproduce: python lagging.py --seed 1      (synthetic, d = 1: z kept to the end where `python vae.py --seed 1`
                                          collapses; every seed, and the authors' code on the same data: docs/results.md)
           python lagging.py --seed 1 --train_size 1600 --epochs 1 --plot_posterior 25   (Fig. 2 frames)
           python lagging.py --dataset yahoo --kl_start 1 --cuda (standard ELBO; He et al. Table 1)
           python lagging.py --aggressive 0                      (exactly vae.py)
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
method.add_argument("--aggressive", type=int, default=1, choices=[0, 1],
                    help="1: aggressive encoder training until validation MI stops climbing; 0: vae.py")
method.add_argument("--inner_steps", type=int, default=100, help="at most this many encoder-only steps per batch")
method.add_argument("--window", type=int, default=None,
                    help="stop the encoder-only steps once the loss summed over this many steps went up "
                         "(default 15 for text, 10 for images, as He et al.'s code; --window 100 with "
                         "--inner_steps 100 is a fixed budget of 100 steps)")
args = common.parse_args(parser, __file__)
if args.latent_dim < 1 or args.inner_steps < 1 or (args.window is not None and args.window < 1):
    common.fail("lagging.py needs --latent_dim >= 1 (an encoder to train), --inner_steps >= 1 and --window >= 1")

dataset = data.load(args)
window = args.window or (10 if dataset.kind == "image" else 15)
encoder, decoder, prior = common.build_model(args, dataset)
modules = {"encoder": encoder, "decoder": decoder, "prior": prior}
# one optimiser per network, so that a step can update one side only (Algorithm 1)
optimizers = {name: common.make_optimizer(m.parameters(), args) for name, m in (("encoder", encoder), ("decoder", decoder))}


def infer(x):
    """q(z|x) in one encoder pass."""
    return encoder(x)


def train_step(x, kl_weight, update=("encoder", "decoder")):
    mean, logvar = encoder(x)
    z = common.reparameterize(mean, logvar)                  # [batch, 1, d], one sample
    rec = -decoder.log_prob(x, z)[:, 0]                      # -log p(x|z)
    kl = prior.kl(mean, logvar)                              # closed form
    loss = (rec + kl_weight * kl).mean()                     # -ELBO, KL weighted while annealing
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    # both networks' gradients are clipped together even when only those in `update` step, as in
    # He et al.'s code (the paper leaves it open): a large decoder gradient shortens an encoder-only step.
    # It decides whether z survives: clipping the encoder alone lost z at full size (docs/results.md).
    common.clip_grad(modules.values(), args.clip)
    for name in update:                                      # Algorithm 1 steps one side only
        optimizers[name].step()
    return rec.detach(), kl.detach()


def encoder_steps(x, kl_weight, pool):
    """Algorithm 1's inner loop: encoder-only steps, the first on x, the rest on minibatches drawn at
    random (with replacement, as He et al.'s code) from `pool`, until the loss per word (per image) over
    a window of `window` steps exceeds the previous window's, or `inner_steps` steps. Returns how many
    steps it took. Draws from the dataset's generator, which checkpoints save: --resume is exact."""
    batch, window_loss, window_units, previous = x, 0.0, 0, math.inf
    picks = torch.randint(len(pool), (args.inner_steps,), generator=dataset.generator).tolist()
    for step in range(1, args.inner_steps + 1):
        rec, kl = train_step(batch, kl_weight, update=("encoder",))
        window_loss = window_loss + (rec + kl_weight * kl).sum()       # stays on the device
        window_units += batch.shape[0] * (batch.shape[1] - 1 if dataset.kind == "text" else 1)  # words, images
        if step % window == 0:
            current = window_loss.item() / window_units               # the one host sync per window
            if current > previous:
                break
            previous, window_loss, window_units = current, 0.0, 0
        batch = pool[picks[step - 1]]
    return step


state = common.start(args, dataset, modules, optimizers)
state.setdefault("aggressive", bool(args.aggressive))    # kept in the checkpoint, so --resume
state.setdefault("previous_mi", -math.inf)               # continues in the same mode
for epoch in common.epochs(args, state):
    encoder.train(), decoder.train()
    meter = common.Meter(args, epoch, dataset.steps_per_epoch(args.batch_size))
    aggressive, inner_steps = state["aggressive"], 0
    pool = dataset.batches("train", args.batch_size) if aggressive else None      # inner minibatches
    for x in dataset.batches("train", args.batch_size, shuffle=True):
        analysis.plot_posterior(args, state["step"], infer, decoder, prior, dataset)
        kl_weight = common.kl_weight(args, state["step"], dataset.steps_per_epoch(args.batch_size))
        update = ("encoder", "decoder")
        if aggressive:                         # the encoder catches up, then a decoder-only step
            inner_steps += encoder_steps(x, kl_weight, pool)
            update = ("decoder",)
        rec, kl = train_step(x, kl_weight, update)
        state["step"] += 1
        meter.add(kl_weight, neg_elbo=rec + kl, rec=rec, kl=kl)
    encoder.eval(), decoder.eval()
    val = common.evaluate(infer, decoder, prior, dataset.batches("valid", args.batch_size), args.val_iw_samples)
    mean_inner_steps = inner_steps / max(meter.steps, 1)
    if aggressive:                      # Algorithm 1, aggressive until I_q on validation stops climbing
        state["aggressive"] = val["mi"] > state["previous_mi"]
        state["previous_mi"] = val["mi"]
        print(f"epoch {epoch}: {mean_inner_steps:.1f} encoder-only steps per batch; val mi {val['mi']:.3f}, "
              f"aggressive training {'stays on' if state['aggressive'] else 'off'}", flush=True)
    common.end_epoch(args, state, meter, val, dataset=dataset, modules=modules, optimizers=optimizers,
                     log={"aggressive": aggressive, "inner_steps": mean_inner_steps})
common.final_test(args, state, infer, dataset, modules)
analysis.report(args, infer, dataset, modules)
