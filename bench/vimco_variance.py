"""The variance of vimco.py's gradient estimator for the encoder, against k, beside the plain score-function
estimator (learning signal L_k, no baseline), at a trained run's best weights (not collected by pytest):

    python bench/vimco_variance.py runs/vimco-synthetic_images --k 2 5 50

Each draw takes k samples for each of --images test images and one backward pass; the variance over --draws
draws, summed over the encoder's parameters and divided by the number of images, is printed for both estimators.
"""
import argparse
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import analysis  # noqa: E402


def variance(run, x, k, draws, plain):
    encoder, decoder, prior = run["encoder"], run["decoder"], run["prior"]
    grads = []
    for _ in range(draws):
        q = run["Bernoulli"](encoder(x))
        if plain:
            h, log_q = q.sample(k)
            bound = torch.logsumexp(decoder.log_prob(x, h) + prior.log_prob(h) - log_q, 1) - math.log(k)
            surrogate = bound + bound.detach() * log_q.sum(1)
        else:
            surrogate = run["vimco_bound"](decoder, prior, x, q, k)[1]
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(surrogate.sum(), list(encoder.parameters()))]))
    return torch.stack(grads).var(0).sum().item() / len(x)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a vimco.py run folder (its model.pt)")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 5, 50])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--draws", type=int, default=200)
    cli = parser.parse_args()
    if min(cli.k) < 2 or cli.images < 1 or cli.draws < 2:
        raise SystemExit("error: --k must be >= 2, --images >= 1 and --draws >= 2")
    run = analysis.load_run(cli.run)
    if "vimco_bound" not in run:
        raise SystemExit(f"error: {cli.run} was not trained by vimco.py")
    x = run["dataset"].batches("test", cli.images)[0]
    torch.manual_seed(0)
    print("| k | VIMCO | plain score function | ratio |\n|---|---|---|---|")
    for k in cli.k:
        ours, plain = variance(run, x, k, cli.draws, False), variance(run, x, k, cli.draws, True)
        print(f"| {k} | {ours:.4g} | {plain:.4g} | {ours / plain:.3g} |", flush=True)


if __name__ == "__main__":
    main()
