"""What looks at a trained model or at finished runs: the amortization and approximation gaps (with log p(x) on a
grid), He et al.'s posterior-mean frames, examples, saliency, training curves and the table over seeds. The scripts
call plot_posterior() while training and report() at the end; a run's reports can be made again at any time:
    python analysis.py runs/vae-synthetic                  its default reports: curves.png, examples, saliency
    python analysis.py runs/vae-synthetic --gaps 100 --examples 16 --saliency
    python analysis.py --curves runs/vae-synthetic runs/lagging-synthetic --out curves.png
    python analysis.py --table runs/table1/*               (folders named METHOD-seedN: one row per METHOD)
"""
import argparse
import contextlib
import html
import json
import math
import os
import re
import sys
import time
from unittest import mock

import torch
import torch.nn as nn

import common


def log_prob_chunked(decoder, x, z):
    """decoder.log_prob(x, z) for many samples z [batch, n, d], n split into chunks to bound memory."""
    chunk = max(1, common.chunk_floats(x.device) // (x.shape[0] * decoder.cost_per_sample(x)))
    return torch.cat([decoder.log_prob(x, part) for part in z.split(chunk, 1)], 1)


def write(path, text):                           # a report file, made again whole from the weights each time
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}", flush=True)


def drawing():                                    # matplotlib, imported only to draw; no pyplot: nothing global changes
    from matplotlib.figure import Figure
    from matplotlib.image import imsave
    return Figure, imsave


# Gaps (Cremer et al. 2018): log p(x) - ELBO(q_method) = [log p(x) - ELBO(q*)] + [ELBO(q*) - ELBO(q_method)], the
# approximation plus the amortization gap, q* the best Gaussian for x alone; log p(x) on a grid for d <= 2.

GRID_RADIUS, GRID_STEP = 5.0, 0.2                  # z in [-5, 5]^d: prior mass outside is about 1e-6 per axis
GAP_STEPS, GAP_SAMPLES, GAP_LR = 200, 8, 0.05      # from a VAE's q: 200 steps within 0.003 nats of 400


@torch.no_grad()
def grid_log_px(decoder, prior, x, latent_dim, radius=GRID_RADIUS, step=GRID_STEP):
    """log p(x) = logsumexp_g [log p(x|z_g) + log p(z_g)] + d log(step) over {-radius, ..., radius}^d, d = 1 or 2, and
    the same over every other point: the error falls faster than exponentially in (sd / step)^2, so they agree."""
    if latent_dim not in (1, 2):
        common.fail(f"the grid integrates over d = 1 or 2 latent dimensions, not {latent_dim}")
    n = int(round(2 * radius / step)) + 1
    step, axis = 2 * radius / (n - 1), torch.linspace(-radius, radius, n, device=x.device)
    z = torch.cartesian_prod(*[axis] * latent_dim).view(-1, latent_dim).expand(x.shape[0], -1, -1)   # [batch, n^d, d]
    log_joint = log_prob_chunked(decoder, x, z) + prior.log_prob(z)
    every_other = log_joint.view(-1, *[n] * latent_dim)[(slice(None),) + (slice(None, None, 2),) * latent_dim]
    return (torch.logsumexp(log_joint, 1) + latent_dim * math.log(step),
            torch.logsumexp(every_other.reshape(x.shape[0], -1), 1) + latent_dim * math.log(2 * step))


def optimal_q(decoder, prior, x, mean, logvar, generator):
    """q* = argmax of ELBO(x; mean, logvar) from the start given: Adam on the examples' summed -ELBOs (each alone),
    lr falling to 0. Returns mean*, logvar* and how much each -ELBO still fell in the last tenth (0: converged)."""
    lam, trace = [mean.detach().clone().requires_grad_(), logvar.detach().clone().requires_grad_()], []
    optimizer = torch.optim.Adam(lam, lr=GAP_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / GAP_STEPS)
    with torch.enable_grad(), common.svi_mode(decoder):
        for _ in range(GAP_STEPS):
            f = -decoder.log_prob(x, common.reparameterize(*lam, GAP_SAMPLES, generator)).mean(1) + prior.kl(*lam)
            optimizer.zero_grad()
            f.sum().backward(inputs=lam)                                 # -ELBO_i; the decoder's .grad untouched
            optimizer.step()
            schedule.step()
            trace.append(f.detach())
    tenth, trace = GAP_STEPS // 10, torch.stack(trace)                  # [steps, batch]
    return lam[0].detach(), lam[1].detach(), trace[-2 * tenth:-tenth].mean(0) - trace[-tenth:].mean(0)


@torch.no_grad()
def gaps(infer, decoder, prior, batches, count, samples, seed):
    """The gaps of the first `count` examples, from the method's own q = infer(x); both ELBOs with the same eps (their
    difference nearly free of noise); log p(x) on the grid for d <= 2, else IW with q*. Nats, with standard errors."""
    start, rows, seen, generator = time.time(), [], 0, None
    for x in batches:
        if seen >= count:
            break
        x = x[:count - seen]
        generator = generator or torch.Generator(device=x.device).manual_seed(seed)   # training's stream untouched
        q_method = [t.detach() for t in infer(x)]
        *q_opt, still_falling = optimal_q(decoder, prior, x, *q_method, generator)
        d, elbos = q_method[0].shape[1], []
        eps = torch.randn((x.shape[0], samples, d), generator=generator, device=x.device)
        for mean, logvar in (q_method, q_opt):
            z = mean.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
            log_px_z = log_prob_chunked(decoder, x, z)
            elbos.append(log_px_z.mean(1) - prior.kl(mean, logvar))
        log_q = -0.5 * (common.LOG_2PI + logvar.unsqueeze(1) + eps.pow(2)).sum(-1)   # of the q* samples
        log_px, coarse = grid_log_px(decoder, prior, x, d) if d <= 2 else (
            torch.logsumexp(log_px_z + prior.log_prob(z) - log_q, 1) - math.log(samples), torch.full((len(x),), math.nan))
        rows.append(torch.stack([*elbos, log_px, coarse, still_falling], 1))
        seen += x.shape[0]
    elbo_method, elbo_opt, log_px, coarse, still_falling = torch.cat(rows).T.cpu()
    n = len(log_px)
    result = {"examples": n, "log_px_by": "grid" if d <= 2 else f"importance sampling from q*, {samples} samples",
              "grid_change_at_double_step": (log_px - coarse).abs().max().item() if d <= 2 else None,
              "still_falling": round(still_falling.mean().item(), 4), "seconds": round(time.time() - start, 1)}
    for name, t in (("elbo_method", elbo_method), ("elbo_opt", elbo_opt), ("log_px", log_px),
                    ("amortization_gap", elbo_opt - elbo_method), ("approximation_gap", log_px - elbo_opt)):
        result[name] = round(t.mean().item(), 4)
        result[name + "_se"] = round((t.std() / math.sqrt(n)).item() if n > 1 else math.nan, 4)
    print(f"gaps: {json.dumps(result)}", flush=True)
    return result


# He et al. 2019, Fig. 2: the posterior mean space, which makes posterior collapse visible (d = 1).

@torch.no_grad()
def true_posterior_mean(decoder, prior, x, grid):
    """E_p(z|x)[z] for a scalar latent: log p(x|z) + log p(z) on `grid` [G], normalised by logsumexp. [batch]."""
    z = grid.view(1, -1, 1).expand(x.shape[0], -1, -1)
    return ((log_prob_chunked(decoder, x, z) + prior.log_prob(z)).softmax(1) * grid).sum(1)


def plot_posterior(args, step, infer, decoder, prior, dataset, final=False):
    """With --plot_posterior N, every N steps: the mean of the true posterior (grid, [-20, 20] by 0.1) against that
    of q(z|x) for 500 validation sentences, as posterior/STEP.json and .png (final: the tested weights)."""
    if not args.plot_posterior or (not final and step % args.plot_posterior):
        return
    if args.latent_dim != 1:
        common.fail("--plot_posterior draws the picture for a scalar latent; add --latent_dim 1")
    was_training, points = decoder.training, {"step": step, "method": args.method, "final": final, "true_mean": [],
                                              "q_mean": []}
    decoder.eval()
    with torch.random.fork_rng(devices=[args.device] if args.device.type == "cuda" else []), torch.no_grad():
        for x in dataset.batches("valid", args.batch_size):
            x = x[:500 - len(points["q_mean"])]
            if len(x) == 0:
                break
            points["q_mean"] += infer(x)[0][:, 0].tolist()
            points["true_mean"] += true_posterior_mean(decoder, prior, x, torch.arange(-200, 201, device=x.device) / 10).tolist()
    decoder.train(was_training)
    path = os.path.join(args.save_dir, "posterior", "final" if final else f"{step:07d}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write(path + ".json", json.dumps(points))
    fig = drawing()[0](figsize=(4, 4), layout="tight")
    ax = fig.subplots()
    ax.scatter(points["true_mean"], points["q_mean"], s=6, alpha=0.6)
    ax.plot([-3, 3], [-3, 3], color="gray", linewidth=0.8)
    ax.set(xlim=(-3, 3), ylim=(-3, 3), xlabel="mean of true posterior p(z|x)", ylabel="mean of q(z|x)",
           title=f"{args.method}, " + ("end, tested weights" if final else f"step {step}"))
    fig.savefig(path + ".png", dpi=100)


# Examples and saliency: what the model does, seen through the method's own q(z|x).

def words(vocab, tokens):
    """Token ids (a decoded row, or a sentence with <s> and </s>) as text, up to the first </s>."""
    text = [vocab[t] for t in tokens if vocab[t] != "<s>"]
    return " ".join(text[:text.index("</s>")] if "</s>" in text else text) or "(empty)"


@torch.no_grad()
def text_examples(infer, decoder, prior, dataset, seed, count=8):
    """Lines: prior samples (sampled, greedy), greedy reconstructions from the mean of the method's own q(z|x), and
    greedy sentences between two test sentences' means."""
    vocab, x = dataset.vocab, max(dataset.by_length["test"].values(), key=len)[:count]   # one length: a batch
    generator = torch.Generator(device=x.device).manual_seed(seed)                   # training's stream untouched
    length = max(max(lengths) for lengths in dataset.by_length.values()) + 5
    first, z = torch.full((count,), vocab.index("<s>"), device=x.device), prior.sample(count, generator)
    lines = ["# sentences from the prior p(z), sampled"]
    lines += [words(vocab, row) for row in decoder.sample(z, first, length, generator=generator).tolist()]
    lines += ["", "# the same z, greedy"] + [words(vocab, r) for r in decoder.sample(z, first, length, True).tolist()]
    mean = infer(x)[0].detach()                  # count test sentences, or fewer
    if mean.shape[1] == 0:
        return lines
    lines += ["", "# test sentence  ->  greedy reconstruction from the mean of q(z|x)"]
    lines += [f"{words(vocab, a)}  ->  {words(vocab, b)}"
              for a, b in zip(x.tolist(), decoder.sample(mean, first[:len(x)], length, True).tolist())]
    if len(x) >= 2:
        path = mean[0] + torch.linspace(0, 1, count, device=x.device).unsqueeze(1) * (mean[1] - mean[0])
        lines += ["", f"# interpolation between the posterior means of test sentences 1 and 2 ({count} steps)",
                  f"# from: {words(vocab, x[0].tolist())}", f"# to:   {words(vocab, x[1].tolist())}"]
        lines += [words(vocab, row) for row in decoder.sample(path, first[:1].expand(count), length, True).tolist()]
    return lines


@torch.no_grad()
def image_examples(infer, decoder, prior, dataset, seed, count=8):
    """{name: rows of images}: prior samples; test images over images drawn at the mean of the method's q(z|x); two
    test images with images drawn between their means. One decoder.sample: a PixelCNN takes 784 passes for all."""
    x = dataset.batches("test", count)[0][:count]
    mean, generator = infer(x)[0].detach(), torch.Generator(device=x.device).manual_seed(seed)
    if mean.shape[1] == 0:
        return {}
    path = mean[0] + torch.linspace(0, 1, count, device=x.device).unsqueeze(1) * (mean[-1] - mean[0])
    drawn = decoder.sample(torch.cat([prior.sample(count, generator), mean, path]), generator)[:, 0].split([count, len(mean), count])
    grids = {"samples": [list(drawn[0])], "reconstructions": [list(x[:, 0]), list(drawn[1])]}
    return {**grids, "interpolation": [[x[0, 0], *drawn[2], x[-1, 0]]]} if len(x) >= 2 else grids


def save_grid(path, rows):
    """Rows of [28, 28] images in [0, 1] as one grey PNG, ink dark on white, with a 2-pixel grey border."""
    grid = torch.full((len(rows) * 30 + 2, max(len(r) for r in rows) * 30 + 2), 0.5)
    for i, j, image in [(i, j, image) for i, row in enumerate(rows) for j, image in enumerate(row)]:
        grid[2 + 30 * i:30 * (i + 1), 2 + 30 * j:30 * (j + 1)] = 1 - image.float().cpu()
    drawing()[1](path, grid.numpy(), cmap="gray", vmin=0, vmax=1)
    print(f"wrote {path}", flush=True)


def saliency(infer, encoder, decoder, x):
    """How much the model uses z, token by token, in sentences x [m, T] of one length (after Kim et al. 2018):
      output[i, t] = ||d log p(x_t | x_<t, z) / dz|| at z = the mean of the method's own q(z|x_i), </s> included;
      input[i, t]  = ||d mean / d e_t||_F, e_t the encoder's embedding of token t (None without an nn.Embedding).
    From log_prob alone: log p(x_1..t | z) is log_prob of the first t + 1 tokens, each prefix with its own copy
    of z: one backward pass gives every prefix's gradient, and token t's is the difference."""
    m, length = x.shape
    mean = infer(x)[0].detach()
    with torch.enable_grad():
        z = [mean.unsqueeze(1).clone().requires_grad_() for _ in range(1, length)]
        prefixes = sum(decoder.log_prob(x[:, :t + 1], z[t - 1]).sum() for t in range(1, length))
        grads = torch.cat(torch.autograd.grad(prefixes, z), 1)                      # [m, T - 1, d]
        output = grads.diff(dim=1, prepend=torch.zeros_like(grads[:, :1])).norm(dim=-1)
        embed = getattr(encoder, "embed", None)
        if not isinstance(embed, nn.Embedding):
            return output, None
        d, kept = mean.shape[1], []                  # copy j of each sentence keeps mean dimension j
        hook = embed.register_forward_hook(lambda module, inputs, out: kept.append(out.detach().requires_grad_()) or kept[-1])
        try:
            means = encoder(x.repeat_interleave(d, 0))[0]
        finally:
            hook.remove()
        grad, = torch.autograd.grad((means * torch.eye(d, device=x.device).repeat(m, 1)).sum(), kept[0])
    return output, grad.view(m, d, length, -1).pow(2).sum((1, 3)).sqrt()


def saliency_report(infer, encoder, decoder, dataset, count=8):
    """saliency() of up to `count` test sentences of the most common length: (JSON-ready dict, HTML page)."""
    x = max(dataset.by_length["test"].values(), key=len)[:count]
    if infer(x)[0].shape[1] == 0:                  # no latent
        return None, None
    output, inputs = saliency(infer, encoder, decoder, x)
    rows = [{"input_tokens": [dataset.vocab[t] for t in s], "input": None if inputs is None else inputs[i].tolist(),
             "output_tokens": [dataset.vocab[t] for t in s[1:]], "output": output[i].tolist()}
            for i, s in enumerate(x.tolist())]

    def shade(tokens, values):                     # each row scaled to its own maximum; hover for the value
        return " ".join(f'<span style="background: rgba(220, 40, 40, {v / (max(values) or 1):.2f})" title="{v:.3g}">'
                        f'{html.escape(t)}</span>' for t, v in zip(tokens, values))
    page = "<html><meta charset='utf-8'><body style='font-family: monospace'><p>Saliency (analysis.py): output " \
        "tokens shaded by ||d log p(x_t | x_&lt;t, z) / dz||, input tokens by ||d mean / d embedding||</p>" + "".join(
            ("" if r["input"] is None else f"<p>input: {shade(r['input_tokens'], r['input'])}<br>")
            + f"output: {shade(r['output_tokens'], r['output'])}</p>" for r in rows) + "</body></html>"
    return {"definition": saliency.__doc__.split("\n", 1)[1], "sentences": rows}, page


# Finished runs: training curves from log.jsonl, the test metrics of many runs as a table over seeds.

CURVES = [("-ELBO (train, val) and val NLL", ("train", "neg_elbo"), ("train", "neg_bound"), ("val", "neg_elbo"),
           ("val", "nll")), ("KL (train, val)", ("train", "kl"), ("val", "kl")), ("MI (val)", ("val", "mi")),
          ("active units (val)", ("val", "au")), ("learning rate", ("lr",)), ("KL weight", ("kl_weight",))]


def read_log(folder):
    """The records of FOLDER/log.jsonl (a line that is not a JSON record is skipped)."""
    path, records = os.path.join(folder, "log.jsonl"), []
    for line in open(path, errors="replace").read().splitlines() if os.path.exists(path) else []:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def draw_curves(folders, path):
    """One PNG of the training curves of one or more runs (each run a colour, each quantity a panel)."""
    runs = [(os.path.basename(os.path.normpath(f)), records) for f in folders if (records := read_log(f))]
    if not runs:
        common.fail(f"no log.jsonl with epochs in {', '.join(folders)}; pass run folders (--save_dir of a training run)")
    fig = drawing()[0](figsize=(13, 7), layout="tight")
    axes = fig.subplots(2, 3)
    for ax, (title, *keys) in zip(axes.flat, CURVES):
        for colour, (name, records) in enumerate(runs):
            for style, key in zip(("-", "--", ":", "-."), keys):
                points = [(r["epoch"], value) for r in records
                          if (value := r.get(key[0]) if len(key) == 1 else r.get(key[0], {}).get(key[1])) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{colour}", marker=".",
                            label=f"{name} {'/'.join(key)}" if len(keys) > 1 or len(runs) > 1 else None)
        ax.set(title=title, xlabel="epoch", yscale="log" if title == "learning rate" else "linear")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    print(f"wrote {path}", flush=True)


TABLE_KEYS = ("nll", "neg_elbo", "rec", "kl", "mi", "au", "ppl")


def seed_table(folders):
    """A markdown table of runs' test metrics, mean +- sd over runs, a row per name without -seedN (vae-seed1 -> vae)."""
    groups = {}
    for folder in folders:
        try:
            with open(os.path.join(folder, "metrics.json")) as f:
                metrics = json.load(f)
        except (OSError, ValueError) as e:
            common.fail(f"cannot read {folder}/metrics.json ({getattr(e, 'strerror', None) or e}); pass finished runs")
        groups.setdefault((re.sub(r"[-_]seed\d+$", "", os.path.basename(os.path.normpath(folder))), metrics["dataset"]),
                          []).append(metrics)
    lines = ["| run | dataset | runs | " + " | ".join(TABLE_KEYS) + " |", "|---" * (len(TABLE_KEYS) + 3) + "|"]
    for (name, dataset), runs in groups.items():
        values = [torch.tensor([float(r[k]) for r in runs if r.get(k) is not None], dtype=torch.float64) for k in TABLE_KEYS]
        cells = ["-" if len(v) == 0 else f"{v[0]:.2f}" if len(v) == 1 else f"{v.mean():.2f} +- {v.std():.2f}" for v in values]
        lines.append(f"| {name} | {dataset} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The reports of a run: at the end of training (report), or again from its folder (python analysis.py RUN).

def write_reports(args, infer, dataset, modules, examples=0, saliency_of=0, gaps_of=0, curves=False):
    """Into args.save_dir: gaps.json (gaps_2.json ... if taken) of `gaps_of` test examples; examples.txt or the PNG
    grids of `examples`; saliency.json/.html of `saliency_of` sentences; curves.png (the others made again whole)."""
    decoder, prior, folder = modules["decoder"], modules["prior"], args.save_dir
    if gaps_of:
        result = gaps(infer, decoder, prior, dataset.batches("test", args.batch_size), gaps_of, args.iw_samples, args.seed)
        print(f"wrote {common.write_json(folder, 'gaps', {'method': args.method, **result})}", flush=True)
    if examples and dataset.kind == "text":
        lines = text_examples(infer, decoder, prior, dataset, args.seed, examples)
        print("\n".join(lines[:4] + ["..."]), flush=True)
        write(os.path.join(folder, "examples.txt"), "\n".join(lines) + "\n")
    for name, rows in image_examples(infer, decoder, prior, dataset, args.seed, examples).items() \
            if examples and dataset.kind == "image" else ():
        save_grid(os.path.join(folder, f"{name}.png"), rows)
    report, page = saliency_report(infer, modules.get("encoder"), decoder, dataset, saliency_of) \
        if saliency_of and dataset.kind == "text" else (None, None)
    if report:
        write(os.path.join(folder, "saliency.json"), json.dumps(report, indent=1))
        write(os.path.join(folder, "saliency.html"), page)
    if curves and read_log(folder):                # no log after --epochs 0
        draw_curves([folder], os.path.join(folder, "curves.png"))


def report(args, infer, dataset, modules):
    """The end of a run, after common.final_test: gaps.json with --gaps N; after training (not --eval_only) also the
    last posterior frame, the examples and saliency of --examples N, and curves.png."""
    if not args.eval_only:
        plot_posterior(args, None, infer, modules["decoder"], modules["prior"], dataset, final=True)
    own = 0 if args.eval_only else args.examples
    write_reports(args, infer, dataset, modules, own, own, args.gaps, curves=not args.eval_only)


def load_run(folder, script=None):
    """A run's model (best weights) and its method's own inference, built by the script that trained it (or `script`):
    its setup, before `state = common.start(`, run with --eval_only. Returns the script's globals (args, infer, ...)."""
    path = os.path.join(folder, "model.pt")
    payload = common.load_checkpoint(path)
    method = payload["args"]["method"]
    places = [script] if script else [f"{method}.py", os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{method}.py")]
    script = next((p for p in places if os.path.isfile(p)), None) or common.fail(
        f"{path} was trained by {method}.py, which is not in this folder or beside analysis.py; pass --script PATH")
    source = open(script).read()
    if "state = common.start(" not in source:
        common.fail(f"{script} is not a method script of this project (it has no line 'state = common.start(')")
    cross = ["--cross_method"] if os.path.splitext(os.path.basename(script))[0] != method else []
    namespace = {"__name__": "analysis_run", "__file__": script}
    with mock.patch.object(sys, "argv", [script, "--eval_only", "--checkpoint", path, "--save_dir", folder, *cross]):
        exec(compile(source[:source.index("state = common.start(")], script, "exec"), namespace)
    common.check_model(namespace["modules"])
    common.load_modules(path, payload, "best_modules", namespace["modules"])
    for module in namespace["modules"].values():
        module.eval()
    return namespace


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("runs", nargs="+", metavar="RUN", help="run folders (the --save_dir of training runs)")
    add("--gaps", type=int, default=0, metavar="N", help="the gaps of the first N test examples into gaps.json")
    add("--examples", type=int, default=0, metavar="N", help="N samples, reconstructions, interpolation steps")
    add("--saliency", action="store_true", help="saliency.json and .html of the test sentences (text)")
    add("--curves", action="store_true", help="the training curves of all RUNs in one PNG")
    add("--table", action="store_true", help="the RUNs' test metrics, mean +- sd over the seeds of a run name")
    add("--out", help="--curves: the PNG (default RUN/curves.png for one run); --table: also write it here")
    add("--script", help="the script whose model and inference to use (default: METHOD.py of the run)")
    cli = parser.parse_args()
    default = not (cli.gaps or cli.examples or cli.saliency or cli.curves or cli.table)   # a run's own reports
    if cli.table:
        print(table := seed_table(cli.runs))
        if cli.out:
            write(cli.out, table + "\n")
    if cli.curves:
        draw_curves(cli.runs, cli.out or os.path.join(cli.runs[0] if len(cli.runs) == 1 else ".", "curves.png"))
    for folder in cli.runs if cli.gaps or cli.examples or cli.saliency or default else []:
        run = load_run(folder, cli.script)
        write_reports(run["args"], run["infer"], run["dataset"], run["modules"], 8 if default else cli.examples,
                      (cli.examples or 8) if cli.saliency or default else 0, cli.gaps, curves=default)
