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


@contextlib.contextmanager
def saving(path):                                 # a report file, made again whole each time; one line if it cannot be
    try:                                          # (a full disk: the run and its metrics are not touched)
        yield
    except OSError as e:
        common.fail(f"cannot write {path} ({e.strerror or e}); make room, then python analysis.py RUN makes it again")
    print(f"wrote {path}", flush=True)


def write(path, text):
    with saving(path), open(path, "w") as f:
        f.write(text)


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
    start, rows, seen, generator, progress = time.time(), [], 0, None, common.Progress("gaps", count, " examples")
    for x in batches:
        if seen >= count:
            break
        x = x[:count - seen]
        generator = generator or torch.Generator(device=x.device).manual_seed(seed)   # training's stream untouched
        if not isinstance(q := common.as_q(infer(x)), common.Gaussian):        # q* is the best Gaussian
            common.fail(f"the gaps compare Gaussian q's; this method's q is {type(q).__name__}")
        q_method = [q.mean.detach(), q.logvar.detach()]
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
        progress(seen)
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
            points["q_mean"] += common.as_q(infer(x)).mean[:, 0].tolist()
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
    with saving(path + ".png"):
        fig.savefig(path + ".png", dpi=100)


# Examples and saliency: what the model does, seen through the method's own q(z|x).

def words(vocab, tokens):
    """Token ids (a decoded row, or a sentence with <s> and </s>) as text, up to the first </s>."""
    text = [vocab[t] for t in tokens if vocab[t] != "<s>"]
    return " ".join(text[:text.index("</s>")] if "</s>" in text else text) or "(empty)"


@torch.no_grad()
def text_examples(infer, decoder, prior, dataset, seed, count=8):
    """Lines: prior samples (sampled, greedy), greedy reconstructions from the mean of the method's own q(z|x), and
    greedy sentences between two test sentences' means; without a latent, sentences sampled from the model."""
    vocab, x = dataset.vocab, max(dataset.by_length["test"].values(), key=len)[:count]   # one length: a batch
    generator = torch.Generator(device=x.device).manual_seed(seed)                   # training's stream untouched
    length = max(max(lengths) for lengths in dataset.by_length.values()) + 5
    first, z = torch.full((count,), vocab.index("<s>"), device=x.device), prior.sample(count, generator)
    mean = common.as_q(infer(x)).mean.detach()
    sampled = [words(vocab, row) for row in decoder.sample(z, first, length, generator=generator).tolist()]
    if mean.shape[1] == 0:
        return ["# sentences sampled from the model (no latent: nothing to reconstruct or interpolate)"] + sampled
    lines = ["# sentences from the prior p(z), sampled"] + sampled
    lines += ["", "# the same z, greedy"] + [words(vocab, r) for r in decoder.sample(z, first, length, True).tolist()]
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
def image_examples(infer, decoder, prior, dataset, seed, count=8, budget=math.inf, again="python analysis.py RUN"):
    """{name: rows of images}: prior samples; test images over images drawn at the mean of the method's q(z|x); two
    test images with images drawn between their means (samples only without a latent). A PixelCNN takes 784 passes
    to draw: the images are drawn a few at a time, with progress, and no further once `budget` seconds would be
    passed (only whole rows are kept)."""
    x = dataset.batches("test", count)[0][:count]
    mean, generator = common.as_q(infer(x)).mean.detach(), torch.Generator(device=x.device).manual_seed(seed)
    path = mean[0] + torch.linspace(0, 1, count, device=x.device).unsqueeze(1) * (mean[-1] - mean[0])
    sizes = dict(samples=count, reconstructions=len(x), interpolation=count if len(x) >= 2 else 0) if mean.shape[1] else \
        dict(samples=count)
    z = torch.cat([prior.sample(count, generator), mean, path])[:sum(sizes.values())]
    drawn, progress = [], common.Progress("drawing images", len(z))
    while len(drawn) < len(z):
        elapsed = max(time.time() - progress.start, 1e-6)
        size = min(len(z) - len(drawn), max(1, int(10 * len(drawn) / elapsed)) if drawn else 1)   # about 10 s a call
        if drawn and elapsed * (len(drawn) + size) / len(drawn) > budget:
            print(f"drew {len(drawn)} of {len(z)} images: more would take longer than {common.duration(budget)} (the time "
                  f"training took, at least 10 s); {again} --examples {count} draws them all", flush=True)
            break
        drawn += list(decoder.sample(z[len(drawn):len(drawn) + size], generator)[:, 0])
        progress(len(drawn))
    grids, at = {}, 0
    for name, size in sizes.items():
        if size and at + size <= len(drawn):
            row = drawn[at:at + size]
            grids[name] = {"samples": [row], "reconstructions": [list(x[:, 0]), row],
                           "interpolation": [[x[0, 0], *row, x[-1, 0]]]}[name]
        at += size
    return grids


def save_grid(path, rows):
    """Rows of [28, 28] images in [0, 1] as one grey PNG, ink dark on white, with a 2-pixel grey border."""
    grid = torch.full((len(rows) * 30 + 2, max(len(r) for r in rows) * 30 + 2), 0.5)
    for i, j, image in [(i, j, image) for i, row in enumerate(rows) for j, image in enumerate(row)]:
        grid[2 + 30 * i:30 * (i + 1), 2 + 30 * j:30 * (j + 1)] = 1 - image.float().cpu()
    with saving(path):
        drawing()[1](path, grid.numpy(), cmap="gray", vmin=0, vmax=1)


def saliency(infer, encoder, decoder, x):
    """How much the model uses z, token by token, in sentences x [m, T] of one length (after Kim et al. 2018):
      output[i, t] = ||d log p(x_t | x_<t, z) / dz|| at z = the mean of the method's own q(z|x_i), </s> included;
      input[i, t]  = ||d mean / d e_t||_F, e_t the encoder's embedding of token t (None without an nn.Embedding).
    From log_prob alone: log p(x_1..t | z) is log_prob of the first t + 1 tokens, each prefix with its own copy
    of z: one backward pass gives every prefix's gradient, and token t's is the difference. The prefixes go in
    chunks of at most chunk_floats floats (each counted at the full length), so memory is bounded at any length."""
    m, length = x.shape
    mean, grads, progress = common.as_q(infer(x)).mean.detach(), [], common.Progress("saliency", length - 1, " prefixes")
    per_chunk = max(1, common.chunk_floats(x.device) // (m * decoder.cost_per_sample(x)))
    chunks = [range(1, length)[i:i + per_chunk] for i in range(0, length - 1, per_chunk)]
    with torch.enable_grad():
        for prefixes in chunks:
            z = [mean.unsqueeze(1).clone().requires_grad_() for _ in prefixes]
            grads += torch.autograd.grad(sum(decoder.log_prob(x[:, :t + 1], zt).sum() for t, zt in zip(prefixes, z)), z)
            progress(prefixes[-1])
        grads = torch.cat(grads, 1)                                                  # [m, T - 1, d]
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


def saliency_report(infer, encoder, decoder, dataset, count=8, longest=100):
    """saliency() of up to `count` test sentences of the most common length up to `longest` words (the cost grows as
    the length squared): (JSON-ready dict, HTML page). One scale per page, so pages and rows compare."""
    groups = [t for n, t in dataset.by_length["test"].items() if n <= longest + 2]
    if not groups or common.as_q(infer(groups[0][:1])).mean.shape[1] == 0:
        print("saliency: " + ("no latent" if groups else f"every test sentence is longer than {longest} words"
                              ) + ": nothing to show", flush=True)
        return None, None
    x = max(groups, key=len)[:count]
    output, inputs = saliency(infer, encoder, decoder, x)
    rows = [{"input_tokens": [dataset.vocab[t] for t in s], "input": None if inputs is None else inputs[i].tolist(),
             "output_tokens": [dataset.vocab[t] for t in s[1:]], "output": output[i].tolist()}
            for i, s in enumerate(x.tolist())]
    top = {"output": output.max().item(), "input": 0.0 if inputs is None else inputs.max().item()}
    scale = f"full red is {top['output']:.3g} (output), {top['input']:.3g} (input)" + (
        "; every value is below 0.01: the model barely uses z" if max(top.values()) < 0.01 else "")
    print(f"saliency: {scale}", flush=True)

    def shade(tokens, values, kind):               # one scale per page; hover for the value
        return " ".join(f'<span style="background: rgba(220, 40, 40, {v / (top[kind] or 1):.2f})" title="{v:.3g}">'
                        f'{html.escape(t)}</span>' for t, v in zip(tokens, values))
    page = "<html><meta charset='utf-8'><body style='font-family: monospace'><p>Saliency (analysis.py): output " \
        "tokens shaded by ||d log p(x_t | x_&lt;t, z) / dz||, input tokens by ||d mean / d embedding||; " \
        f"<b>{html.escape(scale)}</b></p>" + "".join(
            ("" if r["input"] is None else f"<p>input: {shade(r['input_tokens'], r['input'], 'input')}<br>")
            + f"output: {shade(r['output_tokens'], r['output'], 'output')}</p>" for r in rows) + "</body></html>"
    return {"definition": saliency.__doc__.split("\n", 1)[1], "scale": top, "sentences": rows}, page


# Finished runs: training curves from log.jsonl, the test metrics of many runs as a table over seeds.

CURVES = [("-ELBO (train, val) and val NLL", ("train", "neg_elbo"), ("train", "neg_bound"), ("val", "neg_elbo"),
           ("val", "nll")), ("KL (train, val)", ("train", "kl"), ("val", "kl")), ("MI (val)", ("val", "mi")),
          ("active units (val)", ("val", "au")), ("learning rate", ("lr",)), ("KL weight", ("kl_weight",))]


def read_log(folder):
    """The epoch records of FOLDER/log.jsonl; lines that are not one are skipped, with a warning that counts them."""
    path, records, skipped = os.path.join(folder, "log.jsonl"), [], 0
    for line in open(path, errors="replace").read().splitlines() if os.path.exists(path) else []:
        with contextlib.suppress(ValueError):
            if isinstance(record := json.loads(line), dict) and isinstance(record.get("epoch"), int):
                records.append(record)
                continue
        skipped += 1
    if skipped:
        print(f"warning: {path}: {skipped} lines are not epoch records (skipped)", flush=True)
    return records


def value(record, key):                           # record["train"]["kl"] for key ("train", "kl"); None if absent
    for part in key:
        record = record.get(part) if isinstance(record, dict) else None
    return record


def draw_curves(folders, path):
    """One PNG of the training curves of one or more runs: a panel per quantity (constant ones only named in the
    title), a colour per run (per line with one run), a line style and marker per line of a panel."""
    runs = [(os.path.basename(os.path.normpath(f)), read_log(f)) for f in folders]
    if missing := [f for f, (_, records) in zip(folders, runs) if not records]:
        common.fail(f"no log.jsonl with epochs in {', '.join(missing)}; pass run folders (the --save_dir of training runs)")
    panels, constant = [], []
    for title, *keys in CURVES:
        lines = [(f"{name} {'/'.join(key)}", f"C{r if len(runs) > 1 else k}", k, points)
                 for r, (name, records) in enumerate(runs) for k, key in enumerate(keys)
                 if (points := [(rec["epoch"], v) for rec in records if isinstance(v := value(rec, key), (int, float))])]
        values = {v for *_, points in lines for _, v in points}
        if len(values) > 1:
            panels.append((title, lines))
        elif values:
            constant.append(f"{title.split(' (')[0]} {values.pop():.4g}")
    rows, last = max(1, math.ceil(len(panels) / 3)), max(rec["epoch"] for _, records in runs for rec in records)
    fig = drawing()[0](figsize=(13, 0.5 + 3.3 * rows), layout="tight")
    for ax, (title, lines) in zip(fig.subplots(rows, 3, squeeze=False).flat, panels):
        for label, colour, k, points in lines:
            ax.plot(*zip(*points), ("-", "--", ":", "-.")[k], color=colour, marker=".x^s"[k], label=label)
        ax.set(title=title, xlabel="epoch", xlim=(0.5, last + 0.5), yscale="log" if title == "learning rate" else "linear")
        ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
        ax.legend(fontsize=7)
    for ax in fig.axes[len(panels):]:
        ax.set_visible(False)
    if constant:
        fig.suptitle("constant: " + ", ".join(constant), fontsize=9)
    with saving(path):
        fig.savefig(path, dpi=90)


TABLE_KEYS = ("nll", "neg_elbo", "rec", "kl", "mi", "au", "ppl")


def seed_table(folders):
    """A markdown table of runs' test metrics, mean +- sd over runs, a row per name without -seedN (vae-seed1 -> vae),
    method and dataset (runs named alike of different methods or datasets are never averaged together)."""
    groups = {}
    for folder in folders:
        path = os.path.join(folder, "metrics.json")
        try:
            with open(path) as f:
                metrics = json.load(f)
        except (OSError, ValueError) as e:
            common.fail(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); pass finished runs")
        if not (isinstance(metrics, dict) and all(isinstance(metrics.get(k), str) for k in ("method", "dataset"))
                and all(isinstance(metrics.get(k), (int, float, type(None))) for k in TABLE_KEYS)):
            common.fail(f"{path} is not the metrics.json of a run (a JSON object with method, dataset and numbers for "
                        f"{', '.join(TABLE_KEYS)})")
        name = re.sub(r"[-_]seed\d+$", "", os.path.basename(os.path.normpath(folder)))
        groups.setdefault((name, metrics["method"], metrics["dataset"]), []).append(metrics)
    names = [name for name, *_ in groups]
    if alike := sorted({name for name in names if names.count(name) > 1}):
        print(f"warning: runs named {', '.join(alike)} are of different methods or datasets: a row for each", flush=True)
    lines = ["| run | method | dataset | runs | " + " | ".join(TABLE_KEYS) + " |", "|---" * (len(TABLE_KEYS) + 4) + "|"]
    for (name, method, dataset), runs in groups.items():
        values = [torch.tensor([float(r[k]) for r in runs if r.get(k) is not None], dtype=torch.float64) for k in TABLE_KEYS]
        cells = ["-" if len(v) == 0 else f"{v[0]:.2f}" if len(v) == 1 else f"{v.mean():.2f} +- {v.std():.2f}" for v in values]
        lines.append(f"| {name} | {method} | {dataset} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The reports of a run: at the end of training (report), or again from its folder (python analysis.py RUN).

def write_reports(args, infer, dataset, modules, examples=0, saliency_of=0, gaps_of=0, curves=False, budget=math.inf):
    """Into args.save_dir: gaps.json (gaps_2.json ... if taken) of `gaps_of` test examples; examples.txt or the PNG
    grids of `examples` (images: drawn within `budget` seconds); saliency.json/.html of `saliency_of` sentences;
    curves.png (the others made again whole)."""
    decoder, prior, folder = modules["decoder"], modules["prior"], args.save_dir
    if curves and read_log(folder):                # first (cheap, nothing later can lose it); no log after --epochs 0
        draw_curves([folder], os.path.join(folder, "curves.png"))
    if gaps_of:
        result = gaps(infer, decoder, prior, dataset.batches("test", args.batch_size), gaps_of, args.iw_samples, args.seed)
        print(f"wrote {common.write_json(folder, 'gaps', {'method': args.method, **result})}", flush=True)
    if examples and dataset.kind == "text":
        lines = text_examples(infer, decoder, prior, dataset, args.seed, examples)
        print("\n".join(lines[:4] + ["..."]), flush=True)
        write(os.path.join(folder, "examples.txt"), "\n".join(lines) + "\n")
    again = f"python analysis.py {folder}"
    for name, rows in image_examples(infer, decoder, prior, dataset, args.seed, examples, budget, again).items() \
            if examples and dataset.kind == "image" else ():
        save_grid(os.path.join(folder, f"{name}.png"), rows)
    report, page = saliency_report(infer, modules.get("encoder"), decoder, dataset, saliency_of) \
        if saliency_of and dataset.kind == "text" else (None, None)
    if report:
        write(os.path.join(folder, "saliency.json"), json.dumps(report, indent=1))
        write(os.path.join(folder, "saliency.html"), page)


def report(args, infer, dataset, modules):
    """The end of a run, after common.final_test: gaps.json with --gaps N; after training (not --eval_only) also the
    last posterior frame, the examples and saliency of --examples N (images drawn within the time training took, or
    10 s), and curves.png."""
    if not args.eval_only:
        plot_posterior(args, None, infer, modules["decoder"], modules["prior"], dataset, final=True)
    own, took = 0 if args.eval_only else args.examples, sum(r["seconds"] for r in read_log(args.save_dir))
    write_reports(args, infer, dataset, modules, own, own, args.gaps, curves=not args.eval_only, budget=max(took, 10))


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


def main(cli):
    if cli.gaps < 0 or not 0 <= cli.examples <= common.MAX_EXAMPLES:
        common.fail(f"--gaps must be >= 0 and --examples in [0, {common.MAX_EXAMPLES}]")
    if cli.out and (cli.table == cli.curves or not os.path.isdir(os.path.dirname(cli.out) or ".") or (
            cli.curves and os.path.splitext(cli.out)[1].lower() not in (".png", ".pdf", ".svg"))):
        common.fail(f"--out {cli.out}: it goes with one of --table (any file) or --curves (.png, .pdf or .svg), in a "
                    f"folder that exists")
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
    try:
        main(parser.parse_args())
    except KeyboardInterrupt:
        common.fail("interrupted (Ctrl-C); the run folders are as they were, but for the reports already written")
