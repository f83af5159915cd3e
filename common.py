"""What every method needs to train and be scored, in seven parts (the lines "# N. ..." below): 1. Gaussian math
and the prior, 2. networks, 3. SVI pieces, 4. evaluation, 5. arguments, 6. training, 7. runs on disk. The
objectives and inference procedures are in the method scripts; what looks at a trained model (gaps, examples,
saliency, curves, tables) is in analysis.py. A function here gets what it needs as arguments. The model is an
encoder, a decoder and a prior, and everything that scores or samples uses them (docs/design.md, Interfaces).
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def fail(message):                                # one clear line, no traceback: what is wrong and how to fix it
    raise SystemExit(f"error: {message}")


# 1. Distributions: q(z|x) = N(mean, diag(exp(logvar))) and the prior (a script may bring its own q: vimco.py).

def sample_q(mean, logvar, n=1, generator=None):
    """n samples z = mean + exp(logvar / 2) * eps, [batch, n, d], and log q(z|x) of each, [batch, n],
    computed from eps: exact even where z - mean rounds to 0 (logvar of -60 and below in float32)."""
    eps = torch.randn((mean.shape[0], n, mean.shape[1]), generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
    return z, -0.5 * (LOG_2PI + logvar.unsqueeze(1) + eps.pow(2)).sum(-1)


def reparameterize(mean, logvar, n=1, generator=None):
    """n samples z = mean + exp(logvar / 2) * eps (Kingma & Welling 2014): [batch, n, d]."""
    return sample_q(mean, logvar, n, generator)[0]


def log_normal(z, mean, logvar):
    """log N(z; mean, diag(exp(logvar))), summed over the last dimension (arguments broadcast); finite for every
    finite logvar: (z - mean) / sd is formed before squaring, and a zero difference counts 0 where 1 / sd overflows."""
    diff = z - mean
    scaled = torch.where(diff == 0, torch.zeros_like(diff), diff * torch.exp(-0.5 * logvar))
    return -0.5 * (LOG_2PI + logvar + scaled.pow(2)).sum(-1)


class Gaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) as evaluate() takes any q (from an infer() that returns (mean, logvar)):
    sample(n) -> (z [batch, n, d], log q(z|x) [batch, n]); log_prob(z) for z [..., batch or 1, d] (broadcast against
    each example's q); entropy() [batch]; mean [batch, d]; kl(prior) [batch], by the prior's own closed form."""

    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar

    def sample(self, n, generator=None):
        return sample_q(self.mean, self.logvar, n, generator)

    def log_prob(self, z):
        return log_normal(z, self.mean, self.logvar)

    def entropy(self):
        return 0.5 * (LOG_2PI + 1 + self.logvar).sum(-1)

    def kl(self, prior):
        return prior.kl(self.mean, self.logvar)


def as_q(q):
    """What infer() returned, as a q: (mean, logvar) is a Gaussian (detached); a q object (vimco.py's Bernoulli) is kept."""
    return Gaussian(*(t.detach() for t in q)) if isinstance(q, tuple) else q


class StandardNormal(nn.Module):
    """The prior p(z) = N(0, I). A script that changes the prior gives its own module with these three methods."""

    def __init__(self, latent_dim):
        super().__init__()
        self.latent_dim = latent_dim

    def log_prob(self, z):                         # summed over the last dimension
        return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)

    def sample(self, n, generator):                # [n, d] from `generator`, on its device
        return torch.randn(n, self.latent_dim, generator=generator, device=generator.device)

    def kl(self, mean, logvar):
        """KL(q || p(z)) in closed form, summed over d (Kingma & Welling 2014, Appendix B); expm1 keeps
        exp(logvar) - 1 - logvar >= 0 in floating point when q is close to the prior."""
        return 0.5 * (mean.pow(2) + torch.expm1(logvar) - logvar).sum(-1)


# 2. Networks. Text: LSTMs over words. Images: binary 28x28, Bernoulli likelihoods from logits (exact, no clamping).

def dropout(t, p, training, generator=None):
    """F.dropout, or with a generator a mask that can be drawn again (SA-VAE's backward loop replays steps)."""
    if not training or p == 0:
        return t
    if generator is None:
        return F.dropout(t, p, True)
    keep = torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype) >= p
    return t * keep / (1 - p)


class LSTMEncoder(nn.Module):
    """A one-layer LSTM over the embedded sentence, its last state giving mean and logvar (bias=False: He et al.'s)."""

    def __init__(self, vocab_size, emb_dim, hidden_dim, latent_dim, bias=True):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, emb_dim)
        self.lstm = nn.LSTM(emb_dim, hidden_dim, batch_first=True)
        self.to_params = nn.Linear(hidden_dim, 2 * latent_dim, bias=bias)
        # He et al. 2019's initialisation: small weights, so the encoder starts near the prior.
        for p in self.parameters():
            nn.init.uniform_(p, -0.01, 0.01)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, x):
        _, (h, _) = self.lstm(self.embed(x))     # sentences in a batch have equal length: h is the last
        return self.to_params(h[-1]).chunk(2, -1)


class NoEncoder(nn.Module):                       # latent_dim 0: no latent, empty parameters
    def forward(self, x):
        return torch.zeros(x.shape[0], 0, device=x.device), torch.zeros(x.shape[0], 0, device=x.device)


class LSTMDecoder(nn.Module):
    """p(x|z) = prod_t p(x_t | x_<t, z), a one-layer LSTM (Kim et al. 2018; He et al. 2019): z joined to every input
    embedding and setting the initial state (c0 = W z, h0 = tanh(c0)); dropout on the embeddings and before the
    output. latent_dim 0: a language model. z_to_output adds U z to the logits; bias=False as He et al.'s code."""

    def __init__(self, vocab_size, emb_dim, hidden_dim, latent_dim, dropout=0.0, z_to_output=False, bias=True):
        super().__init__()
        self.vocab_size, self.latent_dim, self.p = vocab_size, latent_dim, dropout
        self.embed = nn.Embedding(vocab_size, emb_dim)
        self.lstm = nn.LSTM(emb_dim + latent_dim, hidden_dim, batch_first=True)
        self.init_state = nn.Linear(latent_dim, hidden_dim, bias=bias) if latent_dim > 0 else None
        self.out = nn.Linear(hidden_dim, vocab_size, bias=bias)
        self.z_out = nn.Linear(latent_dim, vocab_size, bias=False) if z_to_output else None
        for p in self.parameters():
            nn.init.uniform_(p, -0.01, 0.01)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def logits(self, inputs, z, state=None, generator=None):
        """inputs [m, T] token ids, z [m, d] -> logits [m, T, vocab] and the final LSTM state."""
        emb = dropout(self.embed(inputs), self.p, self.training, generator)
        if self.latent_dim > 0:
            emb = torch.cat([emb, z.unsqueeze(1).expand(-1, inputs.shape[1], -1)], -1)
            if state is None:
                c0 = self.init_state(z).unsqueeze(0)
                state = (torch.tanh(c0), c0)
        h, state = self.lstm(emb, state)
        logits = self.out(dropout(h, self.p, self.training, generator))
        if self.z_out is not None:
            logits = logits + self.z_out(z).unsqueeze(1)
        return logits, state

    def log_prob(self, x, z, generator=None):
        """log p(x|z) for x [batch, T] (from <s>) and z [batch, n, d]: [batch, n]; every predicted token, </s> too."""
        batch, n = z.shape[:2]
        x = x.unsqueeze(1).expand(-1, n, -1).reshape(batch * n, -1)
        logits, _ = self.logits(x[:, :-1], z.reshape(batch * n, -1), generator=generator)
        nll = F.cross_entropy(logits.reshape(-1, self.vocab_size), x[:, 1:].reshape(-1), reduction="none")
        return -nll.view(batch, n, -1).sum(-1)

    def cost_per_sample(self, x):                  # floats one (example, sample) takes in log_prob: sizes chunks
        return x.shape[1] * (self.vocab_size + self.lstm.hidden_size)

    @torch.no_grad()
    def sample(self, z, first, length, greedy=False, generator=None):
        """`length` tokens [m, length] after the tokens `first` [m] given z [m, d] (sequential by nature)."""
        tokens, state, inputs = [], None, first.unsqueeze(1)
        for _ in range(length):
            logits, state = self.logits(inputs, z, state)
            if greedy:
                inputs = logits[:, -1].argmax(-1, keepdim=True)
            else:
                # inverse-CDF sampling: much faster than torch.multinomial for large batches on CPU
                cdf = logits[:, -1].softmax(-1).cumsum(-1)
                u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
                inputs = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[1] - 1)
            tokens.append(inputs)
        return torch.cat(tokens, 1)


def bernoulli_log_prob(logits, x):
    """log p(x) per pixel for Bernoulli(sigmoid(logits))."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none")


class ResidualBlock(nn.Module):
    def __init__(self, channels_in, channels):                  # stride 2: the skip is a strided 1x1 convolution
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(channels_in, channels, 3, 2, 1), nn.Conv2d(channels, channels, 3, 1, 1)
        self.skip = nn.Conv2d(channels_in, channels, 1, 2)

    def forward(self, x):
        return F.elu(self.conv2(F.elu(self.conv1(x))) + self.skip(x))


class ImageEncoder(nn.Module):
    """q(z|x) = N(mean, diag(exp(logvar))) with (mean, logvar) = net(x), for one of two nets. resnet: He et al.
    2019's, three residual blocks of 64 maps, stride 2 (28 -> 14 -> 7 -> 4), a 4x4 convolution to 512 units (no
    batch norm: q(z|x) never depends on the batch). mlp: Burda et al. 2016's 784-200-200, tanh units."""

    def __init__(self, latent_dim, net="resnet", hidden=200, channels=64):
        super().__init__()
        if net == "resnet":
            self.net = nn.Sequential(ResidualBlock(1, channels), ResidualBlock(channels, channels),
                                     ResidualBlock(channels, channels), nn.Conv2d(channels, 512, 4), nn.ELU(),
                                     nn.Flatten(), nn.Linear(512, 2 * latent_dim))
        else:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                     nn.Tanh(), nn.Linear(hidden, 2 * latent_dim))

    def forward(self, x):
        return self.net(x).chunk(2, -1)


class CausalConv(nn.Conv2d):
    """A convolution that sees only the past (van den Oord et al. 2016): the vertical stack the rows above, the
    horizontal the pixels to the left (and the current one with include_center), by padding and shifting."""

    def __init__(self, channels_in, channels_out, kernel, stack, include_center):
        half = kernel // 2
        size = (half + 1, kernel) if stack == "vertical" else (1, half + 1)
        super().__init__(channels_in, channels_out, size)
        shift = 0 if include_center else 1
        if stack == "vertical":   # pad (left, right, top, bottom); drop the last rows to shift down
            self.pad, self.crop = (half, half, half + shift, 0), (shift, 0)
        else:
            self.pad, self.crop = (half + shift, 0, 0, 0), (0, shift)

    def forward(self, x):
        out = super().forward(F.pad(x, self.pad))
        return out[..., :out.shape[-2] - self.crop[0], :out.shape[-1] - self.crop[1]]


def gate(t):
    """tanh(a) * sigmoid(b) for t = [a, b] split along the channels."""
    a, b = t.chunk(2, 1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """A gated PixelCNN layer with a vertical and a horizontal stack, out = tanh(a) * sigmoid(b). The first (mask A)
    excludes the current pixel and takes the z maps unshifted (every pixel may see z); later ones are residual."""

    def __init__(self, channels_in, channels, kernel, first, z_maps=0):
        super().__init__()
        self.first = first
        self.vertical = CausalConv(channels_in, 2 * channels, kernel, "vertical", include_center=not first)
        self.horizontal = CausalConv(channels_in, 2 * channels, kernel, "horizontal", include_center=not first)
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.z_to_v = nn.Conv2d(z_maps, 2 * channels, 1) if z_maps else None
        self.z_to_h = nn.Conv2d(z_maps, 2 * channels, 1) if z_maps else None

    def forward(self, v, h, maps=None):
        v_pre = self.vertical(v)          # depends only on rows strictly above
        h_pre = self.horizontal(h) + self.v_to_h(v_pre)
        if maps is not None:
            v_pre, h_pre = v_pre + self.z_to_v(maps), h_pre + self.z_to_h(maps)
        gated = self.h_out(gate(h_pre))
        return gate(v_pre), gated if self.first else h + gated


class PixelCNNDecoder(nn.Module):
    """p(x|z) = prod_i Bernoulli(x_i | x_<i, z), pixels in raster order: a gated PixelCNN (van den Oord et al. 2016),
    z mapped to feature maps joined at the first layer; He et al. 2019's 13 layers (five 7x7, four 5x5, four 3x3)."""

    def __init__(self, latent_dim, channels=64, kernels=(7, 7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3), z_maps=4):
        super().__init__()
        self.latent_dim, self.channels, self.z_maps = latent_dim, channels, z_maps if latent_dim > 0 else 0
        self.z_to_maps = nn.Linear(latent_dim, self.z_maps * 28 * 28) if latent_dim > 0 else None
        self.layers = nn.ModuleList(GatedLayer(1 if i == 0 else channels, channels, k, first=i == 0,
                                               z_maps=self.z_maps if i == 0 else 0)
                                    for i, k in enumerate(kernels))
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, 1, 1))

    def logits(self, images, z):
        """Bernoulli logits of every pixel given the pixels before it: images [m, 1, 28, 28], z [m, d]."""
        maps = self.z_to_maps(z).view(len(images), self.z_maps, 28, 28) if self.latent_dim > 0 else None
        v, h = self.layers[0](images, images, maps)
        for layer in self.layers[1:]:
            v, h = layer(v, h)
        return self.out(h)

    def log_prob(self, x, z, generator=None):          # no dropout: generator is for the common interface
        batch, n = z.shape[:2]
        images = x.unsqueeze(1).expand(-1, n, -1, -1, -1).reshape(batch * n, *x.shape[1:])
        return bernoulli_log_prob(self.logits(images, z.reshape(batch * n, -1)), images).view(batch, n, -1).sum(-1)

    def cost_per_sample(self, x):
        return 6 * self.channels * x[0].numel()

    @torch.no_grad()
    def sample(self, z, generator=None):
        """Images [m, 1, 28, 28] drawn from p(x|z), pixel by pixel (one pass of the network per pixel)."""
        images = torch.zeros(len(z), 1, 28, 28, device=z.device)
        for i in range(28 * 28):
            p = torch.sigmoid(self.logits(images, z)[:, 0, i // 28, i % 28])
            images[:, 0, i // 28, i % 28] = (torch.rand(p.shape, generator=generator, device=z.device) < p).float()
        return images


class MLPDecoder(nn.Module):
    """Burda et al. 2016's decoder: d-200-200-784 Bernoulli logits, tanh units; pixels independent given z."""

    def __init__(self, latent_dim, hidden=200):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 784))

    def log_prob(self, x, z, generator=None):
        return bernoulli_log_prob(self.net(z), x.flatten(1).unsqueeze(1).expand(-1, z.shape[1], -1)).sum(-1)

    def cost_per_sample(self, x):
        return 784 + 400

    @torch.no_grad()
    def sample(self, z, generator=None):
        p = torch.sigmoid(self.net(z))
        return (torch.rand(p.shape, generator=generator, device=z.device) < p).float().view(-1, 1, 28, 28)


def build_model(args, dataset):
    """The encoder, decoder and prior for a dataset, sized from args; with --oracle the decoder is the data's true
    generator, frozen (Kim et al. 2018, Sec. 5.1)."""
    if args.latent_dim == 0:
        encoder = NoEncoder()
    elif dataset.kind == "image":
        encoder = ImageEncoder(args.latent_dim, "resnet" if args.image_net == "pixelcnn" else "mlp", args.hidden_dim)
    else:
        encoder = LSTMEncoder(dataset.vocab_size, args.emb_dim, args.hidden_dim, args.latent_dim, bool(args.bias))
    if dataset.kind == "text":
        decoder = LSTMDecoder(dataset.vocab_size, args.emb_dim, args.hidden_dim, args.latent_dim, args.dropout,
                              bias=bool(args.bias))
    else:
        decoder = (MLPDecoder if args.image_net == "mlp" else PixelCNNDecoder)(args.latent_dim, args.hidden_dim)
    if args.oracle:      # built above all the same, so that the random streams are those of a learned decoder
        decoder = dataset.true_decoder             # requires_grad False: make_optimizer leaves it out
    return encoder.to(args.device), decoder.to(args.device), StandardNormal(args.latent_dim).to(args.device)


def check_model(modules):
    """Before the first step: a model changed in a copied script has every method the shared code calls."""
    for name, methods in {"decoder": ("log_prob", "sample", "cost_per_sample"), "prior": ("log_prob", "sample", "kl")}.items():
        if name not in modules:
            fail(f"the script's modules have no '{name}': add it to the modules dict (it is saved and scored)")
        if missing := [m for m in methods if not callable(getattr(modules[name], m, None))]:
            fail(f"the {name} ({type(modules[name]).__name__}) has no {', '.join(missing)}: every {name} needs "
                 f"{', '.join(methods)} (docs/design.md, Interfaces)")


# 3. SVI pieces that svi.py and savae.py share; their steps (Kim et al. 2018, Alg. 2) are in those scripts. Per
# example: the steps' objective is the SUM of the sentences' -ELBOs, so row i of its gradient is sentence i's own,
# and clipping (mean and logvar separately) acts row by row: no sentence's steps depend on the batch. Kim et al.'s
# objective was the batch MEAN (a step of lr / B per sentence): --svi_lr a here is their lr a * B at batch B.

def svi_objective(decoder, prior, x, mean, logvar, kl_weight, generator):
    """f_i = -ELBO of each example, one sample, KL weighted: [batch]; eps, then dropout masks, from `generator`."""
    z = reparameterize(mean, logvar, 1, generator)
    return -decoder.log_prob(x, z, generator)[:, 0] + kl_weight * prior.kl(mean, logvar)


@contextlib.contextmanager
def svi_mode(decoder):
    """The decoder's nn.LSTMs in train mode during SVI steps, in evaluation too, as cuDNN's LSTM has a backward only
    there; without dropout between layers their output is the same (the decoder's own dropout reads its mode)."""
    lstms = [m for m in decoder.modules() if isinstance(m, nn.LSTM) and not m.training and not m.dropout]
    for m in lstms:
        m.train()
    try:
        yield
    finally:
        for m in lstms:
            m.eval()


def clip_rows(g, max_norm):
    """Each row of g scaled to norm at most max_norm (0: off)."""
    return g * (max_norm / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1) if max_norm > 0 else g


# 4. Evaluation: every method scored the same way, with its own inference.

def chunk_floats(device):
    """Floats an evaluation chunk's outputs may take: 2**25 on a CPU, a sixteenth of a GPU's free memory."""
    if device.type != "cuda":
        return 2 ** 25
    free, _ = torch.cuda.mem_get_info(device)
    return max(2 ** 25, free // 16)


@torch.no_grad()
def evaluate(infer, decoder, prior, batches, iw_samples, max_floats=None, what="evaluation"):
    """Scores a model on batches with the method's own inference `infer(x)`, a q (as_q: (mean, logvar) or a q object;
    called under no_grad; an infer that needs gradients enables them itself). From the same z ~ q(z|x), per example:
      nll      -log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x)   (Burda et al. 2016; S = iw_samples)
      rec      -(1/S) sum_s log p(x|z_s)
      kl       KL(q(z|x) || p(z)) = q.kl(prior) (closed form for N(0, I));  neg_elbo = rec + kl
      mi       E_x E_q[log q(z|x)] - E_x E_q[log q(z)], q(z) the mixture over the evaluation batch
               (He et al. 2019, Sec. 4.2; bounded by log batch size)
      au       dimensions with Var_x(E_q[z_u]) >= 0.01 (unbiased variance over all examples)
      ppl      exp(total nll / total predicted tokens), tokens include </s> (text only; None for images)
    Batched over examples and samples, in chunks of at most max_floats (default: chunk_floats); one host sync."""
    was_training, batches = decoder.training, list(batches)
    decoder.eval()
    sums, means, num_examples, num_tokens = 0, [], 0, 0
    progress = Progress(what, sum(map(len, batches)), " examples")
    for x in batches:
        q = as_q(infer(x))
        batch, d = q.mean.shape
        samples = iw_samples if d > 0 else 1        # no latent: log p(x) is exact, one pass suffices
        max_floats = max_floats or chunk_floats(x.device)
        per_sample = batch * (decoder.cost_per_sample(x) + batch * d)   # decoder, and the pairwise densities
        chunk = max(1, min(samples, max_floats // per_sample))
        log_w, log_px_z, log_qz = [], [], []
        for start in range(0, samples, chunk):
            z, log_q = q.sample(min(chunk, samples - start))
            log_px_z.append(decoder.log_prob(x, z))
            log_w.append(log_px_z[-1] + prior.log_prob(z) - log_q)
            # log q(z_is) with q(z) = (1/B) sum_j q(z | x_j): [batch, n, batch] densities
            log_qz.append(torch.logsumexp(q.log_prob(z.unsqueeze(2)), -1) - math.log(batch))
        log_w, log_px_z, log_qz = torch.cat(log_w, 1), torch.cat(log_px_z, 1), torch.cat(log_qz, 1)
        nll = -(torch.logsumexp(log_w, 1) - math.log(samples))
        mi = -q.entropy() - log_qz.mean(1) if d > 0 else torch.zeros_like(nll)   # E_q[log q(z|x)] = -entropy
        sums = sums + torch.stack([nll.sum(), -log_px_z.mean(1).sum(), q.kl(prior).sum(), mi.sum()])
        means.append(q.mean)
        num_examples += batch
        progress(num_examples)
        if x.dtype == torch.long:
            num_tokens += batch * (x.shape[1] - 1)    # predicted tokens: all but <s>
    decoder.train(was_training)
    if num_examples == 0:
        fail("evaluation got no examples: the split is empty")
    nll, rec, kl, mi = (sums / num_examples).tolist()
    means = torch.cat(means)
    au = int((means.var(0) >= 0.01).sum()) if means.shape[1] > 0 and num_examples > 1 else 0
    per_token = sums[0].item() / max(num_tokens, 1)
    ppl = (math.exp(per_token) if per_token < 709 else math.inf) if num_tokens else None   # exp overflows past 709.78
    return {"nll": nll, "neg_elbo": rec + kl, "rec": rec, "kl": kl, "mi": mi, "au": au, "ppl": ppl,
            "iw_samples": iw_samples, "num_examples": num_examples}


# 5. Arguments. A dataset preset fills every flag the user did not give; explicit flags win.

TEXT_PRESET = dict(epochs=100, batch_size=32, lr=1.0, optimizer="sgd", clip=5.0, latent_dim=32,
                   emb_dim=512, hidden_dim=1024, dropout=0.5, warmup=10, kl_start=0.1, patience=2, bias=1)
PRESETS = {
    # He et al. 2019, App. B.1: d = 1, 50-unit LSTMs, batch 16, SGD lr 1, standard ELBO, networks without bias.
    "synthetic": dict(epochs=20, batch_size=16, lr=1.0, optimizer="sgd", clip=5.0, latent_dim=1,
                      emb_dim=50, hidden_dim=50, dropout=0.5, warmup=0, kl_start=1.0, patience=2, bias=0),
    # Kim et al. 2018 / He et al. 2019 text setting, with the 0.1 -> 1 KL annealing over 10 epochs.
    "yahoo": TEXT_PRESET, "yelp": TEXT_PRESET, "ptb": TEXT_PRESET, "text": TEXT_PRESET,
    # Omniglot (He et al. 2019, Table 2): ResNet encoder, 13-layer gated PixelCNN with 64 maps (hidden_dim), d = 32.
    "omniglot": dict(epochs=500, batch_size=50, lr=1e-3, optimizer="adam", clip=5.0, latent_dim=32,
                     emb_dim=0, hidden_dim=64, dropout=0.0, warmup=0, kl_start=1.0, patience=10, bias=1),
    # Kim et al. 2018, Sec. 5.1 (an oracle generator, d = 2); their App. B.1 (unverified): 100-unit LSTMs, batch 50,
    # SGD lr 1, 100 epochs with annealing. Ours: Adam lr 1e-3 (SGD lr 1 diverges with the sharp true generator),
    # the standard ELBO and 3 epochs, to fit a CPU.
    "synthetic_oracle": dict(epochs=3, batch_size=50, lr=1e-3, optimizer="adam", clip=5.0, latent_dim=2,
                             emb_dim=100, hidden_dim=100, dropout=0.0, warmup=0, kl_start=1.0, patience=2, bias=1),
    # The image path at CPU size: same networks, few maps.
    "synthetic_images": dict(epochs=10, batch_size=50, lr=1e-3, optimizer="adam", clip=5.0, latent_dim=4,
                             emb_dim=0, hidden_dim=16, dropout=0.0, warmup=0, kl_start=1.0, patience=10, bias=1),
}
MLP_PRESET = dict(latent_dim=50, hidden_dim=200)   # --image_net mlp: Burda et al. 2016's 784-200-200-50
MODEL_KEYS = ("dataset", "image_net", "latent_dim", "emb_dim", "hidden_dim", "bias", "oracle")
# This command's own work: --eval_only never takes it from a checkpoint, --resume may change it (and the device).
OWN_WORK = ("epochs", "print_every", "iw_samples", "val_iw_samples", "gaps", "plot_posterior", "examples")
RESUME_MAY_CHANGE = OWN_WORK + ("cuda", "save_dir", "data_dir")
MAX_EXAMPLES = 100                                 # --examples: each is drawn, and read by a person
IMAGE_DATASETS, TEXT_ONLY = ("omniglot", "synthetic_images"), ("emb_dim", "bias", "dropout")
RUN_FLAGS = ("resume", "eval_only", "checkpoint", "cross_method", "from_best")   # about this command: never saved ones


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def add_shared_args(parser):
    """The flags every method script takes, in the same order everywhere (docs/design.md). A flag without a
    default here takes it from the dataset's preset (PRESETS), which --help lists at its end."""
    parser.epilog = "defaults by --dataset (explicit flags win):\n" + "\n".join(
        f"  {name}: " + " ".join(f"--{k} {v}" for k, v in preset.items()) for name, preset in PRESETS.items()) + \
        "\n  with --image_net mlp: " + " ".join(f"--{k} {v}" for k, v in MLP_PRESET.items())
    add = parser.add_argument
    add("--dataset", default="synthetic", choices=sorted(PRESETS), help="data and its preset")
    add("--data_dir", help="folder of the corpus (default data/DATASET)")
    add("--train_size", type=int, default=0, help="use the first N training examples (0: all)")
    add("--eval_size", type=int, default=0, help="use the first N validation and N test examples (0: all)")
    add("--epochs", type=int, help="at most this many epochs (training also stops after 5 lr decays)")
    add("--batch_size", type=int, help="examples per training step")
    add("--lr", type=float, help="learning rate of the model parameters")
    add("--optimizer", choices=["sgd", "adam"], help="of the model parameters")
    add("--clip", type=float, help="clip the gradient norm of encoder and decoder together (0: off)")
    add("--latent_dim", type=int, help="d; 0 trains the autoregressive baseline with no latent")
    add("--emb_dim", type=int, help="word embedding size (text)")
    add("--hidden_dim", type=int, help="LSTM units (text); PixelCNN feature maps or MLP units (images)")
    add("--dropout", type=float, help="decoder dropout on input embeddings and before the output layer")
    add("--bias", type=int, choices=[0, 1], help="biases in the text networks' linear maps (1: Kim et al.'s; 0: He et al.'s)")
    add("--image_net", choices=["pixelcnn", "mlp"], default="pixelcnn", help="ResNet + PixelCNN, or Burda et al.'s MLPs")
    add("--oracle", action="store_true", help="the decoder is the data's true generator (synthetic_oracle), fixed")
    add("--warmup", type=float, help="epochs over which the KL weight rises linearly to 1")
    add("--kl_start", type=float, help="KL weight at the first step (1: no annealing)")
    add("--patience", type=int, help="halve the lr after this many epochs without a better validation -ELBO")
    add("--seed", type=int, default=783435, help="seeds every random draw (0 to 2^63 - 1)")
    add("--cuda", action="store_true", help="run on the GPU")
    add("--save_dir", help="where model.pt, log.jsonl, metrics.json go (default runs/METHOD-DATASET)")
    add("--eval_only", action="store_true", help="score --checkpoint's best weights into metrics_eval_METHOD_epochN.json")
    add("--checkpoint", help="a model.pt to evaluate (with --eval_only)")
    add("--cross_method", action="store_true", help="with --eval_only: score another script's checkpoint")
    add("--resume", action="store_true", help=f"continue SAVE_DIR's run; only --{' --'.join(RESUME_MAY_CHANGE)} may change")
    add("--from_best", action="store_true", help="with --resume: from the best weights, a fresh optimiser and --lr")
    add("--iw_samples", type=int, default=500, help="importance samples for the test NLL")
    add("--val_iw_samples", type=int, default=10, help="importance samples for validation each epoch")
    add("--gaps", type=int, default=0, metavar="N", help="the first N test examples' amortization and approximation gaps")
    add("--examples", type=int, default=8, metavar="N", help=f"N samples, reconstructions, interpolation steps (0: none; "
        f"at most {MAX_EXAMPLES}); images: drawn within the time training took, or 10 s (python analysis.py RUN: all)")
    add("--print_every", type=int, default=200, help="print progress every N training batches")
    add("--plot_posterior", type=int, default=0, metavar="N", help="He et al.'s Fig. 2 (d = 1) every N steps (0: off)")
    return parser


def parse_args(parser, script):
    """Parse, take a saved run's flags, fill from the preset, check flags and folder before any work, seed, print.
    The method's name is the script's file name (a copied script is its own method)."""
    defaults = vars(parser.parse_args([]))
    unset = object()                               # a flag still unset after parsing was not given
    args = parser.parse_args(namespace=argparse.Namespace(**dict.fromkeys(defaults, unset)))
    given = {key for key, value in vars(args).items() if value is not unset}
    for key in defaults.keys() - given:
        setattr(args, key, defaults[key])
    args.method = os.path.splitext(os.path.basename(script))[0]
    if args.eval_only or args.resume:
        take_saved_args(args, given)
    for key, value in {**PRESETS[args.dataset], **(MLP_PRESET if args.image_net == "mlp" else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    image = args.dataset in IMAGE_DATASETS
    if wrong := sorted(given & ({*TEXT_ONLY} if image else {"image_net"})):
        fail(f"--{wrong[0]} is for {'text' if image else 'images'}, and --dataset {args.dataset} is "
             f"{'images' if image else 'text'}: drop it")
    for key in ("latent_dim", "emb_dim", "hidden_dim") if args.oracle else ():   # the true generator's sizes
        if key in given and getattr(args, key) != PRESETS["synthetic_oracle"][key]:
            fail(f"--oracle fixes the decoder to the true generator, whose {key} is "
                 f"{PRESETS['synthetic_oracle'][key]}; drop --{key}")
        setattr(args, key, PRESETS["synthetic_oracle"][key])
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    args.save_dir = args.save_dir or os.path.join("runs", f"{args.method}-{args.dataset}")
    check_flags(args)
    args.device = torch.device("cuda" if args.cuda else "cpu")
    claim_save_dir(args)
    if getattr(sys.modules["__main__"], "__file__", None) == script:    # the script is the program (not imported)
        sys.excepthook = interrupted(args, sys.excepthook)
    torch.manual_seed(args.seed)
    print(f"{args.method}: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
    if args.epochs == 0 and not args.eval_only:
        print("note: --epochs 0 trains nothing: the test scores the initial weights", flush=True)
    return args


def take_saved_args(args, given):
    """--resume and --eval_only: a flag not given comes from the saved run; one given may differ from it only if in
    RESUME_MAY_CHANGE (and --lr with --from_best), and with --eval_only if not in MODEL_KEYS."""
    if args.eval_only and (args.resume or not args.checkpoint):
        fail("--eval_only needs --checkpoint PATH (a model.pt written by these scripts), and not --resume")
    folder = args.save_dir or os.path.join("runs", f"{args.method}-{args.dataset}")
    path = args.checkpoint if args.eval_only else os.path.join(folder, "model.pt")
    if args.resume and not os.path.exists(path):
        fail(f"--resume found no checkpoint {path}: --resume continues the run in --save_dir; pass that run's "
             f"folder as --save_dir, or drop --resume to start a new run")
    saved = load_checkpoint(path)["args"]
    if saved["method"] != args.method and not (args.eval_only and args.cross_method):
        fail(f"{path} was trained by {saved['method']}.py; " + (f"evaluate it with {saved['method']}.py, or add "
             f"--cross_method to score its weights with {args.method}.py's inference" if args.eval_only else
             f"resume it with {saved['method']}.py"))
    for key in sorted(given & saved.keys()):
        differs = getattr(args, key) != saved[key]
        if differs and (key in MODEL_KEYS if args.eval_only else key not in RESUME_MAY_CHANGE + RUN_FLAGS + (
                ("lr",) if args.from_best else ())):
            how = (f"the model and its data come from {path}: drop --{key}" if args.eval_only else "--lr may change "
                   "only with --from_best (continue from the best weights with a fresh optimiser)" if key == "lr"
                   else f"drop --{key} to continue, or start a new run in another --save_dir")
            fail(f"--{key} {getattr(args, key)} differs from {path}'s ({saved[key]}); {how}")
    own = RUN_FLAGS + ("method", "save_dir", "cuda") + (OWN_WORK if args.eval_only else ())
    for key in saved.keys() - given - set(own):        # the device is this machine's: never taken from the checkpoint
        if hasattr(args, key):                         # (another method's own flags are not this script's)
            setattr(args, key, saved[key])
    args.save_dir = args.save_dir or (os.path.dirname(args.checkpoint) or "." if args.eval_only else folder)


def check_flags(args):
    """One clear line for a value no run can use, before any data is read."""
    for ok, message in [
        (args.eval_only or not args.checkpoint, "--checkpoint goes with --eval_only (--resume reads SAVE_DIR/model.pt)"),
        (args.resume or not args.from_best, "--from_best goes with --resume (continue a run from its best weights)"),
        (args.eval_only or not args.cross_method, "--cross_method goes with --eval_only (score another's checkpoint)"),
        (args.dataset == "synthetic_oracle" or not args.oracle, f"--oracle needs data whose generator is known "
         f"(--dataset synthetic_oracle); {args.dataset} has none"),
        (not args.cuda or torch.cuda.is_available(), "--cuda: PyTorch sees no CUDA GPU here; drop --cuda to use the CPU"),
        *[(math.isfinite(value), f"--{key} must be a finite number") for key, value in vars(args).items()
          if isinstance(value, float)],
        (args.lr > 0, "--lr must be > 0"),
        (0 <= args.seed < 2 ** 63, "--seed must be in [0, 2^63 - 1]"),
        (args.examples <= MAX_EXAMPLES, f"--examples must be at most {MAX_EXAMPLES} (each one is drawn and written)"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (args.emb_dim >= 1 or args.dataset in IMAGE_DATASETS, "--emb_dim must be >= 1 for text"),
        (not (args.gaps and args.latent_dim == 0 and not args.oracle), "--gaps needs a latent (--latent_dim > 0)"),
        (args.latent_dim or args.image_net != "mlp", "--image_net mlp needs a latent (pixels independent given z)"),
        *[(getattr(args, key) >= 1, f"--{key} must be >= 1") for key in ("batch_size", "hidden_dim", "patience",
                                                                         "iw_samples", "val_iw_samples", "print_every")],
        *[(getattr(args, key) >= 0, f"--{key} must be >= 0 (0: {what})") for key, what in (
            ("epochs", "score the initial weights"), ("train_size", "all training examples"), ("clip", "off"),
            ("eval_size", "all validation and test examples"),
            ("latent_dim", "no latent"), ("warmup", "no annealing"), ("kl_start", "the KL weight starts at 0"),
            ("examples", "none"), ("plot_posterior", "off"), ("gaps", "off"))]]:
        if not ok:
            fail(message)


def claim_save_dir(args):
    """Before any work: the folder can be written, and a training run holds it alone. SAVE_DIR/lock is locked
    (fcntl.flock) while the process lives and freed by the system however it ends: a second run is refused at once,
    a killed one never blocks --resume. A new run also refuses a folder that holds another run."""
    folder = args.save_dir
    try:
        os.makedirs(folder, exist_ok=True)
        lock = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT)
    except OSError as e:
        fail(f"--save_dir {folder} is a file, not a folder; pass a folder" if os.path.isfile(folder) else
             f"cannot write to --save_dir {folder} ({e.strerror or e}); pass a writable folder")
    if args.eval_only:                             # it writes only new files beside a run: it needs no lock
        return os.close(lock)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"{folder} is in use by {os.pread(lock, 200, 0).decode(errors='replace') or 'another run'}; wait for "
             f"it to end, or pass another --save_dir (nothing was changed)")
    held = [name for name in ("model.pt", "metrics.json", "log.jsonl")
            if os.path.exists(os.path.join(folder, name)) and os.path.getsize(os.path.join(folder, name))]
    if held and not args.resume:
        os.close(lock)                             # nothing was changed, and the folder stays free
        fail(f"{folder} already holds a run ({', '.join(held)}); add --resume to continue it, or pass a new "
             f"--save_dir (nothing was changed)")
    os.ftruncate(lock, 0)                          # the descriptor stays open: the lock is held until exit
    os.pwrite(lock, f"{args.method}.py (process {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M')})".encode(), 0)


# 6. Training: optimisers, gradient clipping, KL annealing, the lr schedule, the progress meter.

def make_optimizer(params, args):
    """SGD or Adam over the parameters that require gradients; with none (svi.py --oracle) an empty group."""
    params = [p for p in params if p.requires_grad] or [{"params": []}]
    return (torch.optim.Adam if args.optimizer == "adam" else torch.optim.SGD)(params, lr=args.lr)


def clip_grad(modules, clip):
    """Clip the gradient norm of all the modules' parameters together, as both papers' code does."""
    if clip > 0:
        nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], clip)


def kl_weight(args, step, steps_per_epoch):
    """KL annealing: linear from kl_start to 1 over `warmup` epochs, updated every step."""
    return min(1.0, args.kl_start + (1.0 - args.kl_start) * step / (args.warmup * steps_per_epoch)) if args.warmup > 0 else 1.0


MAX_DECAYS = 5


def schedule(state, val_loss, optimizers, patience):
    """The papers' lr schedule: halve the lr when validation has not improved for `patience` epochs (training
    stops after 5 halvings). Returns whether val is the best so far."""
    best = val_loss < state["best_val"]
    state["best_val"] = min(val_loss, state["best_val"])
    state["worse_epochs"] = 0 if best else state["worse_epochs"] + 1
    if state["worse_epochs"] >= patience:
        state["lr"], state["decays"], state["worse_epochs"] = state["lr"] / 2, state["decays"] + 1, 0
        for group in [g for opt in optimizers.values() for g in opt.param_groups]:
            group["lr"] = state["lr"]
    return best


def diverged(args, what, value, epoch):             # nothing of the epoch is saved: model.pt holds the last good one
    own = "".join(f" or --{key}" for key in vars(args) if key.endswith("_lr"))   # a method's own step size (--svi_lr)
    fail(f"{what} became {value} in epoch {epoch}; " + (f"{args.save_dir}/model.pt holds epoch {epoch - 1}: continue "
         f"from the best weights with a lower lr: --resume --from_best --lr LOWER" + (f" (or start again with a lower "
         f"{own[4:]})" if own else "") if epoch > 1 else
         f"no checkpoint was written: start again with a lower --lr{own} (or --clip)"))


def duration(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


class Progress:
    """progress(done) prints 'WHAT done/total UNIT, T left' every `every` seconds (a phase that ends sooner
    prints nothing), or `now`; left(done) is the time still to go at the rate so far."""

    def __init__(self, what, total, unit="", every=10.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.start = self.shown = time.time()

    def left(self, done):
        return (time.time() - self.start) * (self.total - done) / max(done, 1)

    def __call__(self, done, extra="", now=False):
        if now or time.time() - self.shown >= self.every and 0 < done < self.total:
            self.shown = time.time()
            print(f"{self.what} {done}/{self.total}{self.unit}{extra}, {duration(self.left(done))} left", flush=True)


class Meter:
    """An epoch's training quantities, meter.add(kl_weight, neg_elbo=..., ...) with [batch] tensors: summed on the
    device (no host sync per step), printed (neg_X as -X) every --print_every of the epoch's `steps` steps and at
    least every minute, with the time left; logged as means ("train")."""

    def __init__(self, args, epoch, steps):          # end: the last step's time (train_seconds excludes validation)
        self.args, self.epoch, self.start, self.end = args, epoch, time.time(), time.time()
        self.names, self.sums, self.examples, self.steps = [], 0, 0, 0
        self.progress = Progress(f"epoch {epoch} step", steps, every=60)

    def add(self, kl_weight, **per_example):
        self.names, self.sums = list(per_example), self.sums + torch.stack([v.detach().sum() for v in per_example.values()])
        self.examples += len(next(iter(per_example.values())))
        self.steps, self.end = self.steps + 1, time.time()
        if self.steps % self.args.print_every == 0 or time.time() - self.progress.shown >= 60:
            shown = " ".join(f"{name.replace('neg_', '-')} {value:.3f}" for name, value in self.result().items())
            self.progress(self.steps, f": {shown} kl_weight {kl_weight:.3f} "
                          f"{self.examples / (time.time() - self.start):.0f} examples/s", now=True)

    def result(self):
        """{name: mean per example}; a value that is not finite stops the run (diverged)."""
        result = dict(zip(self.names, (self.sums / max(self.examples, 1)).tolist())) if self.names else {}
        for name, value in result.items():
            if not math.isfinite(value):
                diverged(self.args, f"training {name.replace('neg_', '-')}", value, self.epoch)
        return result


# 7. Runs on disk. model.pt holds everything, the log lines included: written to a temporary file and renamed,
# then log.jsonl is written again from it, as --resume does. JSON results are written whole, never over a file.

CHECKPOINT_FORMAT = "vi-checkpoint-2"


def start(args, dataset, modules, optimizers):
    """A fresh training state, or with --resume the one in SAVE_DIR/model.pt (a finished run is not trained
    further: only a final test that did not complete runs again); with --eval_only, the checkpoint's best weights."""
    check_model(modules)
    if not (args.resume or args.eval_only):
        return {"epoch": 0, "step": 0, "lr": args.lr, "best_val": math.inf, "worse_epochs": 0, "decays": 0,
                "train_seconds": 0.0, "log": []}
    path = args.checkpoint if args.eval_only else os.path.join(args.save_dir, "model.pt")
    payload = load_checkpoint(path)
    saved = payload["args"]
    if payload["vocab"] != getattr(dataset, "vocab", None):
        fail(f"{path} was trained with another vocabulary than {args.data_dir} gives with --train_size "
             f"{args.train_size}; use its --data_dir {saved['data_dir']} and --train_size {saved['train_size']}")
    load_modules(path, payload, "best_modules" if args.eval_only or args.from_best else "modules", modules)
    if args.eval_only:
        return {**payload["state"], "trained_by": saved["method"]}
    state, metrics = {**payload["state"], "best_modules": payload["best_modules"]}, os.path.join(args.save_dir, "metrics.json")
    write_log(args.save_dir, state["log"])         # the epochs model.pt holds, whatever a kill left in the file
    done = f"after {MAX_DECAYS} lr halvings" if state["decays"] >= MAX_DECAYS else \
        f"at --epochs {args.epochs}" if state["epoch"] >= args.epochs else None
    if done and os.path.exists(metrics):
        print(f"{path}: the run finished {done} (epoch {state['epoch']}) and wrote {metrics}: nothing to do (python "
              f"analysis.py {args.save_dir} writes its reports again; --eval_only --checkpoint {path} scores it again)")
        raise SystemExit(0)
    if done:
        print(f"{path}: the run finished {done} (epoch {state['epoch']}); its final test did not complete: running "
              f"only the final test", flush=True)
    elif os.path.exists(metrics):                  # trained on to a larger --epochs: keep the earlier result
        kept = move_json(metrics, args.save_dir, f"metrics_epoch{state['epoch']}")
        print(f"training continues to --epochs {args.epochs}; the test metrics of epoch {state['epoch']} moved to {kept}")
    for name, opt in optimizers.items() if not args.from_best else ():
        opt.load_state_dict(payload["optimizers"][name])
    if args.from_best:                             # the optimisers are new, made with --lr
        state["lr"], state["worse_epochs"] = args.lr, 0
        print(f"resuming from the best weights (epoch {state['best_epoch']}, validation -elbo {state['best_val']:.3f}) "
              f"with a fresh optimiser at lr {args.lr:g}", flush=True)
    torch.set_rng_state(payload["rng"]["torch"])
    dataset.generator.set_state(payload["rng"]["data"])
    if payload["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    print(f"resumed from {path} after epoch {state['epoch']}", flush=True)
    return state


def epochs(args, state):
    """The epochs still to train (none after 5 lr halvings, none with --eval_only); end_epoch advances them."""
    while not args.eval_only and state["epoch"] < args.epochs and state["decays"] < MAX_DECAYS:
        yield state["epoch"] + 1


def end_epoch(args, state, meter, val, *, dataset, modules, optimizers, log=None):
    """After validation: the lr schedule, the log line (training means, validation, the method's own `log`), the
    checkpoint (latest state and best weights), then log.jsonl. A non-finite loss stops the run, saving nothing."""
    epoch, train = meter.epoch, meter.result()
    for key in ("neg_elbo", "nll"):
        if not math.isfinite(val[key]):
            diverged(args, f"validation {key.replace('_', '-')}", val[key], epoch)
    state["epoch"], state["train_seconds"] = epoch, state["train_seconds"] + meter.end - meter.start
    best = schedule(state, val["neg_elbo"], optimizers, args.patience)
    current = {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
    if best:
        state["best_modules"], state["best_epoch"] = current, epoch
    state["log"].append({"epoch": epoch, "lr": state["lr"], "kl_weight": kl_weight(args, state["step"],
                         dataset.steps_per_epoch(args.batch_size)), "seconds": time.time() - meter.start,
                         "train": train, "val": {k: v for k, v in val.items() if k not in ("iw_samples", "num_examples")},
                         **(log or {})})
    save_checkpoint(os.path.join(args.save_dir, "model.pt"), {
        "format": CHECKPOINT_FORMAT, "args": {k: v for k, v in vars(args).items() if k != "device"},
        "vocab": getattr(dataset, "vocab", None), "modules": current, "best_modules": state["best_modules"],
        "state": {k: v for k, v in state.items() if k != "best_modules"},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "rng": {"torch": torch.get_rng_state(), "data": dataset.generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}})
    write_log(args.save_dir, state["log"])
    shown = [f"{name.replace('neg_', '-')} {value:.3f}" for name, value in list(train.items())[:1]]
    print(f"epoch {epoch}: train {' '.join(shown)} | val nll {val['nll']:.3f} -elbo {val['neg_elbo']:.3f} kl "
          f"{val['kl']:.3f} mi {val['mi']:.3f} au {val['au']} | lr {state['lr']:g}{' (best)' if best else ''}", flush=True)


def final_test(args, state, infer, dataset, modules):
    """The best weights on the test split with --iw_samples, printed and written to metrics.json (--eval_only: a
    new metrics_eval_METHOD_epochN.json naming the checkpoint). Returns the metrics."""
    for name, module in modules.items():
        if "best_modules" in state:                # training ran: test the best weights
            module.load_state_dict(state["best_modules"][name])
        module.eval()
    print(f"test: {dataset.size('test')} examples, {args.iw_samples} importance samples each", flush=True)
    test = evaluate(infer, modules["decoder"], modules["prior"], dataset.batches("test", args.batch_size),
                    args.iw_samples, what="test")
    metrics, stem = {"method": args.method, "dataset": args.dataset, **test, "train_seconds": state["train_seconds"]}, "metrics"
    if args.eval_only:                             # extra keys: which weights these are
        metrics.update(checkpoint=args.checkpoint, checkpoint_epoch=state["epoch"], trained_by=state["trained_by"])
        other = f"_from_{state['trained_by']}" if state["trained_by"] != args.method else ""
        stem = f"metrics_eval_{args.method}{other}_epoch{state['epoch']}"
    print("test: " + json.dumps(metrics), flush=True)
    print(f"wrote {write_json(args.save_dir, stem, metrics)}", flush=True)
    return metrics


def interrupted(args, default):
    """The sys.excepthook of a method script run as the program: Ctrl-C ends it with one line that says what is saved."""
    def hook(kind, value, traceback):
        model, metrics = os.path.join(args.save_dir, "model.pt"), os.path.join(args.save_dir, "metrics.json")
        saved = ("its results are written whole or not at all" if args.eval_only else f"{metrics} is written: python "
                 f"analysis.py {args.save_dir} makes the reports" if os.path.exists(metrics) else f"{model} holds the "
                 f"last finished epoch: continue with python {args.method}.py --resume --save_dir {args.save_dir}"
                 if os.path.exists(model) else "no epoch had finished, so nothing was saved")
        if not issubclass(kind, KeyboardInterrupt):
            return default(kind, value, traceback)
        print(f"\nerror: interrupted (Ctrl-C); {saved}", file=sys.stderr, flush=True)
    return hook


def save_checkpoint(path, payload):
    """To a temporary file (the lock makes its name this run's), then renamed; a failed write leaves model.pt as it was."""
    try:
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:           # torch reports a full disk as a RuntimeError of its own
        full = shutil.disk_usage(os.path.dirname(path) or ".").free < 2 ** 24       # before the partial file goes
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        why = "no space left on device" if full else (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"cannot write the checkpoint {path} ({why}); "
             f"model.pt keeps the last epoch it held: free space, then continue with --resume")


def load_checkpoint(path):
    """A model.pt of these scripts, on the CPU (memory-mapped: reading its args is cheap)."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} is a folder; pass the model.pt inside it ({os.path.join(path, 'model.pt')})"
             if os.path.isdir(path) else f"checkpoint {path} does not exist; train first or pass the path of a model.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        assert payload["format"] == CHECKPOINT_FORMAT
        return payload
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); it is not a model.pt written by this version "
             f"of these scripts")


def load_modules(path, payload, which, modules):
    """The weights `which` ('modules': latest, 'best_modules': best) of a checkpoint into modules."""
    saved, trained_by = payload[which], payload["args"]["method"]
    for name, module in modules.items():
        try:
            module.load_state_dict(saved[name])
        except KeyError:
            fail(f"{path} (trained by {trained_by}.py) has no {name}, only {', '.join(sorted(saved))}; evaluate it "
                 f"with {trained_by}.py")
        except RuntimeError as e:
            fail(f"{path} does not fit this model ({str(e).strip().splitlines()[0]}); evaluate it with {trained_by}.py")


def write_log(folder, records):
    """FOLDER/log.jsonl, one JSON line per epoch, replaced whole."""
    with open(os.path.join(folder, "log.jsonl.tmp"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(os.path.join(folder, "log.jsonl.tmp"), os.path.join(folder, "log.jsonl"))


def move_json(source, folder, stem):
    """`source` renamed FOLDER/STEM.json, or STEM_2.json ... if taken (by os.link, which never replaces a file)."""
    for n in range(1, 10 ** 6):
        with contextlib.suppress(FileExistsError):
            os.link(source, path := os.path.join(folder, f"{stem}{'' if n == 1 else f'_{n}'}.json"))
            os.remove(source)
            return path


def write_json(folder, stem, obj):
    """FOLDER/STEM.json (STEM_2.json ... if taken), written to a temporary file and moved: whole, over no file."""
    try:
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}", suffix=".tmp")
        with os.fdopen(handle, "w") as f:
            json.dump(obj, f, indent=1)
        return move_json(tmp, folder, stem)
    except OSError as e:
        fail(f"cannot write {stem}.json in {folder} ({e.strerror or e}); the results are printed above")
