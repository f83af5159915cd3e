"""What every method shares. The objectives and inference procedures live in the method scripts; a
function here gets everything it needs as arguments (or the shared flags every script takes).

Parts, in this order (each starts with a line "# N. TITLE"):
  1. Gaussian math         reparameterize, sample_q, kl_normal, log_normal, log_prior, neg_entropy;
                           draw and Tiled (noise repeated along the batch, for savae.py's central differences)
  2. Networks              text: LSTMEncoder, LSTMDecoder (+ replayable dropout, LinearNLL), NoEncoder;
                           images: ResNetEncoder, PixelCNNDecoder, MLPEncoder, MLPDecoder; build_model
  3. SVI pieces            svi_objective, clip_rows, svi_generator, svi_mode, trainable
  4. Evaluation            evaluate (IW-NLL, -ELBO, KL, MI, AU, PPL), log_prob_chunked
  5. Gaps and posteriors   gaps (Cremer et al. 2018), grid_log_px; plot_posterior (He et al. 2019, Fig. 2)
  6. Arguments             PRESETS, add_shared_args, parse_args and its checks
  7. Training              make_optimizer, clip_grad, kl_weight, Meter, schedule
  8. Runs on disk          start (keep_freed_memory on a CPU), epochs, end_epoch, final_test; checkpoints,
                           log.jsonl, metrics.json
  9. Reports               text_examples and image_examples (samples, reconstructions, interpolations; write_png),
                           saliency, draw_curves
                           (log.jsonl -> PNG), seed_table (metrics.json of many runs -> markdown);
                           python common.py --curves RUN... | --table RUN...

Interfaces (docs/design.md):
  encoder(x) -> (mean, logvar), each [batch, d]
  decoder.log_prob(x, z) -> [batch, n] for z [batch, n, d]: log p(x|z) summed over tokens or pixels.
"""
import argparse
import contextlib
import ctypes
import glob
import html
import json
import math
import os
import re
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def fail(message):
    """Stop with one clear line (no traceback): what is wrong and how to fix it."""
    raise SystemExit(f"error: {message}")


# ====================================================================================================
# 1. Gaussian math. q = N(mean, diag(exp(logvar))), prior p(z) = N(0, I).
# ====================================================================================================

class Tiled:
    """A generator whose draws repeat along the batch: a draw of [copies * m, ...] is `copies` copies of the
    [m, ...] draw that `generator` itself gives. savae.py's central differences score lambda + r u and
    lambda - r u as one batch, each half with the noise of the step it replays."""

    def __init__(self, generator, copies):
        self.generator, self.copies = generator, copies

    def draw(self, fn, shape, **kwargs):
        part = fn((shape[0] // self.copies, *shape[1:]), generator=self.generator, **kwargs)
        return part.repeat(self.copies, *[1] * (len(shape) - 1))


def draw(fn, shape, generator=None, **kwargs):
    """fn(shape) for fn torch.rand or torch.randn, from `generator` (None: the global one; or a Tiled one)."""
    if isinstance(generator, Tiled):
        return generator.draw(fn, shape, **kwargs)
    return fn(shape, generator=generator, **kwargs)


def reparameterize(mean, logvar, n=1, generator=None):
    """n samples z = mean + exp(logvar / 2) * eps: [batch, n, d]."""
    return sample_q(mean, logvar, n, generator)[0]


def sample_q(mean, logvar, n=1, generator=None):
    """n samples z = mean + exp(logvar / 2) * eps, [batch, n, d], and log q(z|x) of each, [batch, n],
    computed from eps: exact even where z - mean rounds to 0 (logvar of -60 and below in float32)."""
    eps = draw(torch.randn, (mean.shape[0], n, mean.shape[1]), generator, device=mean.device, dtype=mean.dtype)
    z = mean.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
    return z, -0.5 * (LOG_2PI + logvar.unsqueeze(1) + eps.pow(2)).sum(-1)


def kl_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) in closed form, summed over d: [batch].
    Kingma & Welling 2014, Appendix B: -1/2 sum(1 + logvar - mean^2 - exp(logvar)). expm1 keeps
    exp(logvar) - 1 - logvar >= 0 in floating point when q is close to the prior."""
    return 0.5 * (mean.pow(2) + torch.expm1(logvar) - logvar).sum(-1)


def log_normal(z, mean, logvar):
    """log N(z; mean, diag(exp(logvar))), summed over the last dimension (arguments broadcast).
    (z - mean) / sd is formed before squaring, and a zero difference counts 0 even where 1 / sd overflows,
    so the result is finite for every finite logvar (exp(-logvar) alone overflows below about -88)."""
    diff = z - mean
    scaled = torch.where(diff == 0, torch.zeros_like(diff), diff * torch.exp(-0.5 * logvar))
    return -0.5 * (LOG_2PI + logvar + scaled.pow(2)).sum(-1)


def log_prior(z):
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def neg_entropy(logvar):
    """E_q[log q(z|x)] for a diagonal Gaussian, in closed form: [batch]."""
    return -0.5 * (LOG_2PI + 1 + logvar).sum(-1)


# ====================================================================================================
# 2. Networks. Text: LSTMs over words. Images: binary 28x28, every decoder scoring x with a Bernoulli
# likelihood computed from logits (binary_cross_entropy_with_logits: exact, no clamping).
# ====================================================================================================

def dropout(t, p, training, generator=None):
    """Dropout whose mask can come from a local generator, so a step can be replayed with the same
    mask (SA-VAE's finite differences). Without a generator it is F.dropout."""
    if not training or p == 0:
        return t
    if generator is None:
        return F.dropout(t, p, True)
    keep = draw(torch.rand, t.shape, generator, device=t.device, dtype=t.dtype) >= p
    return t * keep / (1 - p)


class LSTMEncoder(nn.Module):
    """Embeds the sentence, runs a one-layer LSTM; its last hidden state gives mean and logvar.
    bias=False drops the bias of that last map, as in He et al.'s code."""

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
        mean, logvar = self.to_params(h[-1]).chunk(2, -1)
        return mean, logvar


class NoEncoder(nn.Module):
    """latent_dim 0: there is no latent, so inference returns empty parameters."""

    def forward(self, x):
        empty = torch.zeros(x.shape[0], 0, device=x.device)
        return empty, empty


class LinearNLL(torch.autograd.Function):
    """-log softmax(h W^T + b)[target] for rows h [m, H]: the vocabulary projection and the cross-entropy as one
    autograd step. Its backward forms d = softmax - one-hot once, from the saved log-probabilities, and scales
    the narrow [m, H] side by the incoming gradient, where autograd's log_softmax and nll_loss backward make
    three more passes over [m, vocabulary] arrays (with keep_freed_memory, a CPU training step at Yahoo's 20k
    words went from 0.53 s to 0.43 s). Under create_graph (savae.py --hvp exact) it recomputes d with differentiable
    operations, so double backward holds. A weight that requires no gradient (svi_mode) costs no product."""

    @staticmethod
    def forward(ctx, h, weight, bias, target):
        log_p = torch.log_softmax(F.linear(h, weight, bias), -1)
        ctx.save_for_backward(h, weight, bias, target, log_p)
        return -log_p.gather(1, target.unsqueeze(1)).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, target, log_p = ctx.saved_tensors
        if torch.is_grad_enabled():                                  # create_graph: differentiable all along
            d = torch.softmax(F.linear(h, weight, bias), -1) - F.one_hot(target, log_p.shape[1]).to(h.dtype)
        else:
            d = log_p.exp()
            d[torch.arange(len(target), device=d.device), target] -= 1
        grad = grad.unsqueeze(1)
        need_h, need_weight, need_bias, _ = ctx.needs_input_grad
        return ((d @ weight) * grad if need_h else None, d.t() @ (h * grad) if need_weight else None,
                grad[:, 0] @ d if need_bias else None, None)


def linear_nll(h, weight, bias, target):
    """-log softmax(h W^T + b)[target] per row: LinearNLL for large [rows, vocabulary] arrays, autograd's
    cross-entropy for small ones (below 2^18 entries), where the custom function's fixed cost, about 0.15 ms
    on a CPU, is more than the passes it saves (3% of an SVI step at the synthetic preset's size)."""
    if h.shape[0] * weight.shape[0] < 2 ** 18:
        return F.cross_entropy(F.linear(h, weight, bias), target, reduction="none")
    return LinearNLL.apply(h, weight, bias, target)


class LSTMDecoder(nn.Module):
    """p(x|z) = prod_t p(x_t | x_<t, z) with a one-layer LSTM (Kim et al. 2018; He et al. 2019).
    z is joined to every input embedding and sets the initial state (c0 = W z, h0 = tanh(c0)).
    Dropout on the input embeddings and on the LSTM output before the vocabulary projection.
    latent_dim 0 makes it a plain LSTM language model. z_to_output also adds a linear map of z to the
    logits (the generator of He et al.'s synthetic data). bias=False drops the biases of the z -> state
    map and of the vocabulary projection, as in He et al.'s code (the LSTM keeps its own)."""

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

    def hidden(self, inputs, z, state=None, generator=None):
        """inputs [m, T] token ids, z [m, d] -> the LSTM's outputs after dropout [m, T, H] and its final state."""
        emb = dropout(self.embed(inputs), self.p, self.training, generator)
        if self.latent_dim > 0:
            emb = torch.cat([emb, z.unsqueeze(1).expand(-1, inputs.shape[1], -1)], -1)
            if state is None:
                c0 = self.init_state(z).unsqueeze(0)
                state = (torch.tanh(c0), c0)
        h, state = self.lstm(emb, state)
        return dropout(h, self.p, self.training, generator), state

    def logits(self, inputs, z, state=None, generator=None):
        """inputs [m, T] token ids, z [m, d] -> logits [m, T, vocab] and the final LSTM state."""
        h, state = self.hidden(inputs, z, state, generator)
        logits = self.out(h)
        if self.z_out is not None:
            logits = logits + self.z_out(z).unsqueeze(1)
        return logits, state

    def log_prob(self, x, z, generator=None):
        """log p(x|z) for x [batch, T] (starting with <s>) and z [batch, n, d]: [batch, n].
        Counts every predicted token, end-of-sentence included; one cross-entropy for all steps."""
        batch, n = z.shape[:2]
        x = x.unsqueeze(1).expand(-1, n, -1).reshape(batch * n, -1)
        inputs, target, z = x[:, :-1], x[:, 1:].reshape(-1), z.reshape(batch * n, -1)
        if self.z_out is None:
            h, _ = self.hidden(inputs, z, generator=generator)
            nll = linear_nll(h.reshape(len(target), -1), self.out.weight, self.out.bias, target)
        else:
            logits, _ = self.logits(inputs, z, generator=generator)
            nll = F.cross_entropy(logits.reshape(-1, self.vocab_size), target, reduction="none")
        return -nll.view(batch, n, -1).sum(-1)

    def cost_per_sample(self, x):
        """Floats one (example, sample) pair needs in log_prob: sizes evaluation chunks."""
        return x.shape[1] * (self.vocab_size + self.lstm.hidden_size)

    @torch.no_grad()
    def sample(self, z, first, length, greedy=False, generator=None):
        """Decode `length` tokens after the tokens `first` [m] given z [m, d]: [m, length].
        Generation is sequential by nature; training and scoring never loop over time."""
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
    def __init__(self, channels_in, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.skip = nn.Conv2d(channels_in, channels, 1, stride) if stride != 1 or channels_in != channels else nn.Identity()

    def forward(self, x):
        return F.elu(self.conv2(F.elu(self.conv1(x))) + self.skip(x))


class ResNetEncoder(nn.Module):
    """He et al. 2019's image encoder: three residual blocks of 64 maps with stride 2 (28 -> 14 -> 7 -> 4),
    a 4x4 convolution to 512 units, then mean and logvar. Without batch normalisation, so that an
    example's q(z|x) never depends on the other examples in its batch."""

    def __init__(self, latent_dim, channels=64, hidden=512):
        super().__init__()
        self.blocks = nn.Sequential(ResidualBlock(1, channels, 2), ResidualBlock(channels, channels, 2),
                                    ResidualBlock(channels, channels, 2), nn.Conv2d(channels, hidden, 4), nn.ELU())
        self.to_params = nn.Linear(hidden, 2 * latent_dim)

    def forward(self, x):
        mean, logvar = self.to_params(self.blocks(x).flatten(1)).chunk(2, -1)
        return mean, logvar


class CausalConv(nn.Conv2d):
    """A convolution that sees only the past: for the vertical stack the rows above (and, with
    include_center, the current row), for the horizontal stack the pixels to the left (and, with
    include_center, the current one). Done by padding and shifting rather than masking, so no
    multiply is spent on weights that would be masked to zero (van den Oord et al. 2016)."""

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
    """One gated PixelCNN layer with a vertical and a horizontal stack: out = tanh(a) * sigmoid(b).
    The first layer (mask A) excludes the current pixel and takes the z feature maps, unshifted (z is
    not data: every pixel, the first included, may see it); later layers (mask B) include the current
    pixel and are residual."""

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
    """p(x|z) = prod_i Bernoulli(x_i | x_<i, z) over 28x28 pixels in raster order: a gated PixelCNN with
    vertical and horizontal stacks (van den Oord et al. 2016), z mapped by a linear layer to feature maps
    that are joined to the image at the first (mask A) layer (He et al. 2019; Kim et al. 2018).
    Default kernels: He et al.'s 13 layers (five 7x7, four 5x5, four 3x3); latent_dim 0 is a plain PixelCNN."""

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
        maps = None
        if self.latent_dim > 0:
            maps = self.z_to_maps(z).view(len(images), self.z_maps, *images.shape[2:])
        v, h = self.layers[0](images, images, maps)
        for layer in self.layers[1:]:
            v, h = layer(v, h)
        return self.out(h)

    def pixel_log_prob(self, x, z):
        """log p(x_i | x_<i, z) for x [batch, 1, 28, 28], z [batch, n, d]: [batch, n, 784]."""
        batch, n = z.shape[:2]
        images = x.unsqueeze(1).expand(-1, n, -1, -1, -1).reshape(batch * n, *x.shape[1:])
        return bernoulli_log_prob(self.logits(images, z.reshape(batch * n, -1)), images).view(batch, n, -1)

    @torch.no_grad()
    def sample(self, z, generator=None):
        """Images [m, 1, 28, 28] drawn from p(x|z) for z [m, d], pixel by pixel in raster order (sequential by
        nature: one pass of the network per pixel, over all m images at once)."""
        images = torch.zeros(len(z), 1, 28, 28, device=z.device)
        for i in range(28 * 28):
            p = torch.sigmoid(self.logits(images, z)[:, 0, i // 28, i % 28])
            images[:, 0, i // 28, i % 28] = (torch.rand(p.shape, generator=generator, device=z.device) < p).float()
        return images

    def log_prob(self, x, z, generator=None):
        """log p(x|z): [batch, n]. (No dropout: generator is accepted for the common interface.)"""
        return self.pixel_log_prob(x, z).sum(-1)

    def cost_per_sample(self, x):
        return 6 * self.channels * x[0].numel()


class MLPEncoder(nn.Module):
    """Burda et al. 2016's encoder: 784-200-200-(mean, logvar) with tanh units."""

    def __init__(self, latent_dim, hidden=200):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, 2 * latent_dim))

    def forward(self, x):
        mean, logvar = self.net(x).chunk(2, -1)
        return mean, logvar


class MLPDecoder(nn.Module):
    """Burda et al. 2016's decoder, the encoder's mirror: d-200-200-784 Bernoulli logits, tanh units.
    Pixels are independent given z."""

    def __init__(self, latent_dim, hidden=200):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 784))

    def log_prob(self, x, z, generator=None):
        """log p(x|z): [batch, n]. (No dropout: generator is accepted for the common interface.)"""
        return bernoulli_log_prob(self.net(z), x.flatten(1).unsqueeze(1).expand(-1, z.shape[1], -1)).sum(-1)

    def cost_per_sample(self, x):
        return 784 + 400

    @torch.no_grad()
    def sample(self, z, generator=None):
        """Images [m, 1, 28, 28] drawn from p(x|z) for z [m, d] (independent pixels)."""
        p = torch.sigmoid(self.net(z))
        return (torch.rand(p.shape, generator=generator, device=z.device) < p).float().view(-1, 1, 28, 28)


def build_model(args, dataset):
    """The encoder and decoder for a dataset (text or images), sized from args. With --oracle the decoder is
    the dataset's true generator, frozen (Kim et al. 2018, Sec. 5.1); parse_args gave args its sizes."""
    if args.latent_dim == 0:
        encoder = NoEncoder()
    elif dataset.kind == "image":
        encoder = MLPEncoder(args.latent_dim, args.hidden_dim) if args.image_net == "mlp" else ResNetEncoder(args.latent_dim)
    else:
        encoder = LSTMEncoder(dataset.vocab_size, args.emb_dim, args.hidden_dim, args.latent_dim, bool(args.bias))
    if dataset.kind == "image":
        if args.image_net == "mlp":
            if args.latent_dim == 0:
                fail("--image_net mlp needs a latent (its pixels are independent given z); use --latent_dim > 0")
            decoder = MLPDecoder(args.latent_dim, args.hidden_dim)
        else:
            decoder = PixelCNNDecoder(args.latent_dim, args.hidden_dim)
    else:
        decoder = LSTMDecoder(dataset.vocab_size, args.emb_dim, args.hidden_dim, args.latent_dim, args.dropout,
                              bias=bool(args.bias))
    if args.oracle:      # built above all the same, so that the random streams are those of a learned decoder
        decoder = dataset.true_decoder             # requires_grad False: make_optimizer leaves it out
    return encoder.to(args.device), decoder.to(args.device)


# ====================================================================================================
# 3. SVI pieces that svi.py and savae.py share. The steps themselves (Kim et al. 2018, Alg. 2), and SA-VAE's
# backward loop through them, are in those scripts.
# Per example: the objective of the steps is the SUM of the sentences' -ELBOs, so row i of its gradient is
# sentence i's own, and clipping (mean and logvar separately) acts row by row: no sentence's steps depend on
# the batch size or on the other sentences. Kim et al.'s objective was the batch MEAN, so their step on a
# sentence was lr / B and their clip acted on the whole batch: --svi_lr a here is their lr a * B at batch B.
# ====================================================================================================

def trainable(module):
    """The parameters that get gradients (not those of --oracle's frozen generator)."""
    return [p for p in module.parameters() if p.requires_grad]


def svi_generator(device):
    """A local generator for one batch's SVI steps, seeded from the global CPU RNG (read, never reseeded):
    runs stay repeatable and resumable, and each step's eps and dropout masks can be replayed."""
    return torch.Generator(device=device).manual_seed(int(torch.randint(2 ** 62, ())))


def svi_objective(decoder, x, mean, logvar, kl_weight, generator):
    """f_i = -ELBO of each example with one sample, KL weighted as in training: [batch]. eps, then the
    dropout masks, come from `generator`, so restoring its state replays the evaluation exactly."""
    z = reparameterize(mean, logvar, 1, generator)
    return -decoder.log_prob(x, z, generator)[:, 0] + kl_weight * kl_normal(mean, logvar)


@contextlib.contextmanager
def svi_mode(decoder):
    """The decoder as SVI's steps use it: they differentiate f with respect to lambda alone, so its parameters
    stop requiring gradients (no parameter gradient is formed: LinearNLL's weight product, the LSTMs' weight
    gradients), and its nn.LSTMs go to train mode, since cuDNN's LSTM has a backward only in train mode. They
    are one-layer LSTMs without dropout, so their output is the same; the decoder's own dropout reads
    decoder.training and is unchanged. On a CPU the LSTM mode changes nothing. Both are restored on exit."""
    lstms = [m for m in decoder.modules() if isinstance(m, nn.LSTM) and not m.training]
    if any(m.num_layers > 1 and m.dropout > 0 for m in lstms):
        raise ValueError("svi_mode needs LSTMs without dropout between layers")
    params = trainable(decoder)
    for m in lstms:
        m.train()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m in lstms:
            m.eval()
        for p in params:
            p.requires_grad_(True)


def clip_rows(g, max_norm):
    """Each row of g scaled to norm at most max_norm (0: off)."""
    if max_norm <= 0:
        return g
    return g * (max_norm / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1)


# ====================================================================================================
# 4. Evaluation: every method scored the same way, with its own inference.
# ====================================================================================================

def exp_or_inf(x):
    """exp(x), inf where it overflows a float (x > 709.78): a perplexity that large is reported, not a crash."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def chunk_floats(device):
    """How many floats the decoder's outputs for one evaluation chunk may take: 2**25 (128 MB) on a CPU, where
    larger chunks are no faster; on a GPU a sixteenth of its free memory (log-softmax and the LSTM's
    intermediates take a few times the logits), so that a chunk keeps the card busy."""
    if device.type != "cuda":
        return 2 ** 25
    free, _ = torch.cuda.mem_get_info(device)
    return max(2 ** 25, free // 16)


def log_prob_chunked(decoder, x, z, max_floats=None):
    """decoder.log_prob(x, z) for many samples z [batch, n, d], n split into chunks to bound memory."""
    max_floats = max_floats or chunk_floats(x.device)
    chunk = max(1, max_floats // (x.shape[0] * decoder.cost_per_sample(x)))
    return torch.cat([decoder.log_prob(x, part) for part in z.split(chunk, 1)], 1)


@torch.no_grad()
def evaluate(infer, decoder, batches, iw_samples, max_floats=None):
    """Scores a model on batches with the method's own inference `infer(x) -> (mean, logvar)`
    (called under no_grad; an infer that needs gradients enables them itself).

    From the same samples z ~ q(z|x), per example and averaged over examples:
      nll      -log (1/S) sum_s p(x, z_s) / q(z_s|x)   (Burda et al. 2016; S = iw_samples)
      rec      -(1/S) sum_s log p(x|z_s)
      kl       KL(q(z|x) || p(z)) in closed form;  neg_elbo = rec + kl
      mi       E_x E_q[log q(z|x)] - E_x E_q[log q(z)], q(z) the mixture over the evaluation batch
               (He et al. 2019, Sec. 4.2; bounded by log batch size)
      au       dimensions with Var_x(E_q[z_u]) >= 0.01 (unbiased variance over all examples)
      ppl      exp(total nll / total predicted tokens), tokens include </s> (text only; None for images)
    Batched over examples and samples, in chunks of at most max_floats (default: chunk_floats of the device);
    one host sync at the end.
    """
    was_training = decoder.training
    decoder.eval()
    sums, means, num_examples, num_tokens = None, [], 0, 0
    for x in batches:
        mean, logvar = infer(x)
        mean, logvar = mean.detach(), logvar.detach()
        batch, d = mean.shape
        samples = iw_samples if d > 0 else 1        # no latent: log p(x) is exact, one pass suffices
        max_floats = max_floats or chunk_floats(x.device)
        per_sample = batch * (decoder.cost_per_sample(x) + batch * d)   # decoder, and the pairwise densities
        chunk = max(1, min(samples, max_floats // per_sample))
        log_w, log_px_z, log_qz = [], [], []
        for start in range(0, samples, chunk):
            z, log_q = sample_q(mean, logvar, min(chunk, samples - start))
            log_px_z.append(decoder.log_prob(x, z))
            log_w.append(log_px_z[-1] + log_prior(z) - log_q)
            # log q(z_is) with q(z) = (1/B) sum_j q(z | x_j): [batch, n, batch] densities
            pairwise = log_normal(z.unsqueeze(2), mean[None, None], logvar[None, None])
            log_qz.append(torch.logsumexp(pairwise, -1) - math.log(batch))
        log_w, log_px_z, log_qz = torch.cat(log_w, 1), torch.cat(log_px_z, 1), torch.cat(log_qz, 1)
        kl = kl_normal(mean, logvar)
        rec = -log_px_z.mean(1)
        nll = -(torch.logsumexp(log_w, 1) - math.log(samples))
        mi = neg_entropy(logvar) - log_qz.mean(1) if d > 0 else torch.zeros_like(nll)
        batch_sums = torch.stack([nll.sum(), rec.sum(), kl.sum(), mi.sum()])
        sums = batch_sums if sums is None else sums + batch_sums
        means.append(mean)
        num_examples += batch
        if x.dtype == torch.long:
            num_tokens += batch * (x.shape[1] - 1)    # predicted tokens: all but <s>
    if was_training:
        decoder.train()
    if num_examples == 0:
        fail("evaluation got no examples: the split is empty")
    nll, rec, kl, mi = (sums / num_examples).tolist()
    means = torch.cat(means)
    au = int((means.var(0) >= 0.01).sum()) if means.shape[1] > 0 and num_examples > 1 else 0
    ppl = exp_or_inf(sums[0].item() / num_tokens) if num_tokens else None
    return {"nll": nll, "neg_elbo": rec + kl, "rec": rec, "kl": kl, "mi": mi, "au": au, "ppl": ppl,
            "iw_samples": iw_samples, "num_examples": num_examples}


# ====================================================================================================
# 5. Gaps and posteriors.
# The true log p(x) of a model with d <= 2 on a grid (Kim et al. 2018, Sec. 5.1), and the amortization and
# approximation gaps of any trained model (Cremer, Li & Duvenaud 2018, "Inference Suboptimality in VAEs"):
#   log p(x) - ELBO(q_method) = [log p(x) - ELBO(q*)] + [ELBO(q*) - ELBO(q_method)]
#                             =  approximation gap    +    amortization gap
# q* is the best Gaussian q for this x alone, found by optimising x's own (mean, logvar) from q_method.
# The posterior mean space of He et al. 2019, Fig. 2, which makes posterior collapse visible.
# ====================================================================================================

GRID_RADIUS, GRID_STEP = 5.0, 0.2          # z in [-5, 5]^d: prior mass outside is about 1e-6 per axis


GAP_STEPS, GAP_SAMPLES, GAP_LR = 200, 8, 0.05      # from a VAE's q: 200 steps within 0.003 nats of 400


@torch.no_grad()
def grid_log_px(decoder, x, latent_dim, radius=GRID_RADIUS, step=GRID_STEP):
    """log p(x) for d = 1 or 2 by a Riemann sum over the grid {-radius, ..., radius}^d with spacing `step`:
        log p(x) = logsumexp_g [log p(x|z_g) + log p(z_g)] + d log(step).
    For a smooth posterior the error falls faster than exponentially in (posterior sd / step)^2, so the same
    sum over every other point (spacing 2 step) is returned too: where the two agree, the grid is fine enough.
    Returns (log_px, log_px_coarse), each [batch]."""
    if latent_dim not in (1, 2):
        fail(f"the grid integrates over d = 1 or 2 latent dimensions, not {latent_dim}")
    n = int(round(2 * radius / step)) + 1
    step = 2 * radius / (n - 1)
    axis = torch.linspace(-radius, radius, n, device=x.device)
    grid = torch.cartesian_prod(*[axis] * latent_dim).view(-1, latent_dim)        # [n^d, d]
    z = grid.expand(x.shape[0], -1, -1)
    log_joint = log_prob_chunked(decoder, x, z) + log_prior(z)                    # [batch, n^d]
    log_px = torch.logsumexp(log_joint, 1) + latent_dim * math.log(step)
    every_other = log_joint.view(-1, *[n] * latent_dim)[(slice(None),) + (slice(None, None, 2),) * latent_dim]
    log_px_coarse = torch.logsumexp(every_other.reshape(x.shape[0], -1), 1) + latent_dim * math.log(2 * step)
    return log_px, log_px_coarse


def optimal_q(decoder, x, mean, logvar, generator, steps=GAP_STEPS, samples=GAP_SAMPLES, lr=GAP_LR):
    """q* = argmax over (mean, logvar) of ELBO(x; mean, logvar), from the given start: Adam, `samples` fresh
    samples per step, lr decaying linearly to 0 over a fixed budget of `steps` steps (no stopping rule: the
    objective is noisy). The objective is the SUM of the examples' -ELBOs and Adam acts elementwise, so each
    example is optimised on its own. Returns mean*, logvar* and, per example, how much the -ELBO still fell
    between the second-last and the last tenth of the steps (near 0 once converged)."""
    lam = [mean.detach().clone().requires_grad_(), logvar.detach().clone().requires_grad_()]
    optimizer = torch.optim.Adam(lam, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / steps)
    trace = []
    # cuDNN's LSTM has no backward in eval mode: the native LSTM runs here
    with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
        for _ in range(steps):
            z = reparameterize(*lam, samples, generator)
            f = -decoder.log_prob(x, z).mean(1) + kl_normal(*lam)                  # -ELBO_i: [batch]
            for t, g in zip(lam, torch.autograd.grad(f.sum(), lam)):              # no .grad into the decoder
                t.grad = g
            optimizer.step()
            schedule.step()
            trace.append(f.detach())
    tenth = max(1, steps // 10)
    trace = torch.stack(trace)                                                     # [steps, batch]
    still_falling = trace[-2 * tenth:-tenth].mean(0) - trace[-tenth:].mean(0)
    return lam[0].detach(), lam[1].detach(), still_falling


@torch.no_grad()
def gap_estimates(decoder, x, q_method, q_opt, samples, generator):
    """ELBO(q_method) and ELBO(q*) per example, each E_q[log p(x|z)] from `samples` samples (the same eps for
    both: their difference is then nearly free of noise) minus the KL in closed form; and the importance-
    weighted log p(x) with q* as proposal (Burda et al. 2016; a lower bound in expectation)."""
    eps = torch.randn((x.shape[0], samples, q_opt[0].shape[1]), generator=generator, device=x.device)
    elbos = []
    for mean, logvar in (q_method, q_opt):
        z = mean.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        log_px_z = log_prob_chunked(decoder, x, z)
        elbos.append(log_px_z.mean(1) - kl_normal(mean, logvar))
    log_q = -0.5 * (LOG_2PI + logvar.unsqueeze(1) + eps.pow(2)).sum(-1)          # of the q* samples, from eps
    log_w = log_px_z + log_prior(z) - log_q
    return elbos[0], elbos[1], torch.logsumexp(log_w, 1) - math.log(samples)


def gaps(infer, decoder, batches, count, latent_dim, samples, seed):
    """--gaps: the gaps of a trained model on the first `count` examples of `batches`, starting from the
    method's own q = infer(x). log p(x) on the grid when latent_dim <= 2, else importance-weighted with q*
    and `samples` samples. All in nats per example (means over examples, with standard errors)."""
    start, was_training = time.time(), decoder.training
    decoder.eval()
    rows, seen, generator = [], 0, None
    for x in batches:
        if seen >= count:
            break
        x = x[:count - seen]
        if generator is None:                      # a local stream: the global one is left as it was
            generator = torch.Generator(device=x.device).manual_seed(seed)
        with torch.no_grad():
            q_method = [t.detach() for t in infer(x)]
        *q_opt, still_falling = optimal_q(decoder, x, *q_method, generator)
        elbo_method, elbo_opt, log_px = gap_estimates(decoder, x, q_method, q_opt, samples, generator)
        coarse = torch.full_like(log_px, math.nan)
        if latent_dim <= 2:
            log_px, coarse = grid_log_px(decoder, x, latent_dim)
        rows.append(torch.stack([elbo_method, elbo_opt, log_px, coarse, still_falling], 1))
        seen += x.shape[0]
    decoder.train(was_training)
    elbo_method, elbo_opt, log_px, coarse, still_falling = torch.cat(rows).T.cpu()
    n = len(log_px)

    def mean_se(t):
        return round(t.mean().item(), 4), round((t.std() / math.sqrt(n)).item() if n > 1 else math.nan, 4)

    amortization, approximation = elbo_opt - elbo_method, log_px - elbo_opt
    result = {"examples": n, "elbo_method": mean_se(elbo_method)[0], "elbo_opt": mean_se(elbo_opt)[0],
              "log_px": mean_se(log_px)[0], "log_px_by": "grid" if latent_dim <= 2 else "iw",
              "amortization_gap": mean_se(amortization)[0], "amortization_gap_se": mean_se(amortization)[1],
              "approximation_gap": mean_se(approximation)[0], "approximation_gap_se": mean_se(approximation)[1],
              "estimate_samples": samples,
              "opt": {"steps": GAP_STEPS, "samples": GAP_SAMPLES, "lr": GAP_LR,
                      "still_falling": mean_se(still_falling)[0]},
              "seconds": round(time.time() - start, 1)}
    if latent_dim <= 2:     # how much log p(x) moves when the spacing doubles (the error at `step` is far smaller)
        change = (log_px - coarse).abs()
        result["grid"] = {"radius": GRID_RADIUS, "step": GRID_STEP, "mean_change_at_double_step": round(change.mean().item(), 6),
                          "max_change_at_double_step": round(change.max().item(), 6)}
    print(f"gaps on {n} test examples: amortization {result['amortization_gap']:.3f} "
          f"(se {result['amortization_gap_se']:.3f}), approximation {result['approximation_gap']:.3f} "
          f"(se {result['approximation_gap_se']:.3f}), log p(x) {result['log_px']:.3f} ({result['log_px_by']}), "
          f"{result['seconds']:.0f}s", flush=True)
    return result


@torch.no_grad()
def true_posterior_mean(decoder, x, grid):
    """E_p(z|x)[z] for a scalar latent, by discretising z on `grid` [G] and normalising
    log p(x|z) + log p(z) with logsumexp: [batch]."""
    z = grid.view(1, -1, 1).expand(x.shape[0], -1, -1)
    log_joint = log_prob_chunked(decoder, x, z) + log_prior(z)
    return (log_joint.softmax(1) * grid).sum(1)


def plot_posterior(args, step, infer, decoder, dataset, count=500, final=False):
    """With --plot_posterior N, every N steps: for `count` validation sentences, the mean of the true
    posterior (grid over [-20, 20], step 0.1) against the mean of q(z|x). Writes posterior/STEP.json
    (to redraw) and posterior/STEP.png; final=True draws the tested weights (STEP_final). Leaves the
    random streams of training untouched."""
    if not args.plot_posterior or (step % args.plot_posterior and not final):
        return
    if args.latent_dim != 1:
        fail("--plot_posterior draws the picture for a scalar latent; add --latent_dim 1")
    was_training = decoder.training
    decoder.eval()
    true_means, q_means, seen = [], [], 0
    with torch.random.fork_rng(devices=[args.device] if args.device.type == "cuda" else []):
        grid = torch.arange(-200, 201, device=args.device) / 10
        for x in dataset.batches("valid", args.batch_size):
            if seen >= count:
                break
            x = x[:count - seen]
            with torch.no_grad():
                q_means.append(infer(x)[0][:, 0])
            true_means.append(true_posterior_mean(decoder, x, grid))
            seen += x.shape[0]
    decoder.train(was_training)
    points = {"step": step, "method": args.method, "final": final, "true_mean": torch.cat(true_means).tolist(),
              "q_mean": torch.cat(q_means).tolist()}
    folder = os.path.join(args.save_dir, "posterior")
    os.makedirs(folder, exist_ok=True)
    name = f"{step:07d}" + ("_final" if final else "")
    if args.eval_only:          # the checkpoint's folder holds the training run's own pictures: never over them
        name = os.path.basename(free_name(folder, f"{step:07d}_eval_{args.method}", ".json"))[:-len(".json")]
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(points, f)
    draw_posterior(points, os.path.join(folder, f"{name}.png"))


def draw_posterior(points, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("--plot_posterior needs matplotlib to draw (pip install matplotlib); the .json data was written")
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(points["true_mean"], points["q_mean"], s=6, alpha=0.6)
    ax.plot([-3, 3], [-3, 3], color="gray", linewidth=0.8)
    ax.set(xlim=(-3, 3), ylim=(-3, 3), xlabel="mean of true posterior p(z|x)",
           ylabel="mean of q(z|x)", title=f"{points['method']}, step {points['step']}"
                                          + (" (end, tested weights)" if points.get("final") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ====================================================================================================
# 6. Arguments. A dataset preset fills every flag the user did not give; explicit flags win.
# ====================================================================================================

TEXT_PRESET = dict(epochs=100, batch_size=32, lr=1.0, optimizer="sgd", clip=5.0, latent_dim=32,
                   emb_dim=512, hidden_dim=1024, dropout=0.5, warmup=10, kl_start=0.1, patience=2, bias=1)


PRESETS = {
    # He et al. 2019, Appendix B.1: d = 1, 50-unit LSTMs, batch 16, SGD lr 1, standard ELBO.
    # He et al.'s text networks have no bias in the (mean, logvar) map, the z -> state map or the vocabulary
    # projection (bias 0); with those biases, aggressive training collapsed in every seed we ran (docs/lagging_history.md).
    "synthetic": dict(epochs=20, batch_size=16, lr=1.0, optimizer="sgd", clip=5.0, latent_dim=1,
                      emb_dim=50, hidden_dim=50, dropout=0.5, warmup=0, kl_start=1.0, patience=2, bias=0),
    # Kim et al. 2018 / He et al. 2019 text setting, with the 0.1 -> 1 KL annealing over 10 epochs.
    "yahoo": TEXT_PRESET, "yelp": TEXT_PRESET, "ptb": TEXT_PRESET, "text": TEXT_PRESET,
    # Omniglot (He et al. 2019, Table 2): ResNet encoder, 13-layer gated PixelCNN with 64 maps, d = 32,
    # Adam lr 1e-3, batch 50, standard ELBO. hidden_dim is the PixelCNN's feature maps.
    "omniglot": dict(epochs=500, batch_size=50, lr=1e-3, optimizer="adam", clip=5.0, latent_dim=32,
                     emb_dim=0, hidden_dim=64, dropout=0.0, warmup=0, kl_start=1.0, patience=10, bias=1),
    # Kim et al. 2018, Sec. 5.1 (data from an oracle generator, d = 2). Their App. B.1 as far as known (unverified):
    # learned model with 100-dim embeddings and 100-unit LSTMs, batch 50, SGD lr 1, clip 5, no dropout, 100 epochs
    # with KL annealing. Ours: Adam lr 1e-3 (SGD lr 1 diverges when the decoder is the sharp true generator, and
    # one optimiser serves both columns), the standard ELBO and 3 epochs, to fit a CPU.
    "synthetic_oracle": dict(epochs=3, batch_size=50, lr=1e-3, optimizer="adam", clip=5.0, latent_dim=2,
                             emb_dim=100, hidden_dim=100, dropout=0.0, warmup=0, kl_start=1.0, patience=2, bias=1),
    # The image path at CPU size: same networks, few maps.
    "synthetic_images": dict(epochs=10, batch_size=50, lr=1e-3, optimizer="adam", clip=5.0, latent_dim=4,
                             emb_dim=0, hidden_dim=16, dropout=0.0, warmup=0, kl_start=1.0, patience=10, bias=1),
}
MLP_PRESET = dict(latent_dim=50, hidden_dim=200)   # --image_net mlp: Burda et al. 2016's 784-200-200-50
ORACLE_SIZES = ("latent_dim", "emb_dim", "hidden_dim")   # --oracle: those of the true generator (its preset's)
MODEL_KEYS = ("dataset", "image_net", "latent_dim", "emb_dim", "hidden_dim", "bias", "oracle")
IMAGE_DATASETS = ("omniglot", "synthetic_images")


def preset_defaults(key):
    """The defaults of a preset flag by dataset, for --help: 'synthetic 20; yahoo, yelp, ptb, text 100; ...'."""
    by_value = {}
    for name, preset in PRESETS.items():
        by_value.setdefault(preset[key], []).append(name)
    text = "; ".join(f"{', '.join(names)} {value:g}" if isinstance(value, float) else f"{', '.join(names)} {value}"
                     for value, names in by_value.items())
    mlp = f"; with --image_net mlp {MLP_PRESET[key]}" if key in MLP_PRESET else ""
    return f"(default by --dataset: {text}{mlp})"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows the default of every flag: a preset flag's for each
    dataset, any other's own."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.dest in PRESETS["synthetic"]:
            return f"{text} {preset_defaults(action.dest)}".strip()
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and "--help" not in action.option_strings:
            text += " (default: %(default)s)"
        return text


def add_shared_args(parser):
    """The flags every method script takes, in the same order everywhere (docs/design.md). A flag without a
    default here takes it from the dataset's preset (PRESETS): --help lists them."""
    add = parser.add_argument
    add("--dataset", default="synthetic", choices=sorted(PRESETS), help="data and its preset")
    add("--data_dir", default=None, help="folder of the corpus (default data/DATASET)")
    add("--train_size", type=int, default=0, help="use the first N training examples (0: all)")
    add("--epochs", type=int, help="at most this many epochs (training also stops after 5 lr decays)")
    add("--batch_size", type=int, help="examples per training step")
    add("--lr", type=float, help="learning rate of the model parameters")
    add("--optimizer", choices=["sgd", "adam"], help="of the model parameters")
    add("--clip", type=float, help="clip the gradient norm of encoder and decoder together (0: off)")
    add("--latent_dim", type=int, help="d; 0 trains the autoregressive baseline with no latent")
    add("--emb_dim", type=int, help="word embedding size (text)")
    add("--hidden_dim", type=int, help="LSTM units (text); PixelCNN feature maps or MLP units (images)")
    add("--dropout", type=float, help="decoder dropout on input embeddings and before the output layer")
    add("--bias", type=int, choices=[0, 1],
        help="text networks: 1 gives the (mean, logvar) map, the z -> state map and the vocabulary projection "
             "biases (Kim et al.'s code); 0 leaves them out (He et al.'s code; the synthetic preset)")
    add("--image_net", choices=["pixelcnn", "mlp"], default="pixelcnn",
        help="images: ResNet encoder + gated PixelCNN decoder, or Burda et al.'s MLPs")
    add("--oracle", action="store_true",
        help="fix the decoder to the data's true generator (synthetic_oracle): only inference is learned")
    add("--warmup", type=float, help="epochs over which the KL weight rises linearly to 1")
    add("--kl_start", type=float, help="KL weight at the first step (1: no annealing)")
    add("--patience", type=int, help="halve the lr after this many epochs without a better validation -ELBO")
    add("--seed", type=int, default=783435)
    add("--cuda", action="store_true", help="run on the GPU")
    add("--save_dir", default=None, help="where model.pt, log.jsonl, metrics.json go (default runs/METHOD-DATASET)")
    add("--eval_only", action="store_true",
        help="only evaluate --checkpoint's best weights on the test split; the metrics go to a new file "
             "metrics_eval_METHOD_epochN.json in the checkpoint's folder (or --save_dir), never over another; "
             "flags not given come from the checkpoint")
    add("--checkpoint", default=None, help="a model.pt to evaluate (with --eval_only)")
    add("--cross_method", action="store_true",
        help="with --eval_only: accept a checkpoint trained by another script; its weights are scored with "
             "this script's inference, and the metrics file names the method that trained them")
    add("--resume", action="store_true",
        help="continue the run in SAVE_DIR (its model.pt); flags not given come from the checkpoint. "
             f"Only {', '.join('--' + k for k in RESUME_MAY_CHANGE)} may differ from it "
             "(--lr only with --from_best). A finished run is not trained further")
    add("--from_best", action="store_true",
        help="with --resume: continue from the best validation weights with a fresh optimiser and the lr of "
             "--lr (e.g. after divergence: --resume --from_best --lr LOWER)")
    add("--iw_samples", type=int, default=500, help="importance samples for the test NLL")
    add("--val_iw_samples", type=int, default=10, help="importance samples for validation each epoch")
    add("--gaps", type=int, default=0, metavar="N",
        help="after testing, the amortization and approximation gaps (Cremer et al. 2018) on the first N test "
             "examples (0: off); log p(x) on a grid when latent_dim <= 2")
    add("--examples", type=int, default=8, metavar="N",
        help="after the final test, what the model does, written to SAVE_DIR: N prior samples, N test "
             "reconstructions, an N-step interpolation (text: examples.txt, and saliency of N test sentences; "
             "images: PNG grids, drawn pixel by pixel: minutes on a CPU); 0: none")
    add("--print_every", type=int, default=200, help="print progress every N training batches")
    add("--plot_posterior", type=int, default=0, metavar="N",
        help="every N training steps (and at step 0) save the posterior-mean-space picture of "
             "He et al. Fig. 2 to SAVE_DIR/posterior/ (latent_dim 1; needs matplotlib)")
    return parser



# --resume may change these flags (they do not change what is trained); every other flag given with --resume
# must equal the checkpoint's. Flags about this command itself (RUN_FLAGS) are never taken from a checkpoint.
RESUME_MAY_CHANGE = ("epochs", "print_every", "iw_samples", "val_iw_samples", "cuda", "save_dir", "data_dir",
                     "gaps", "plot_posterior", "examples")


RUN_FLAGS = ("resume", "eval_only", "checkpoint", "cross_method", "from_best")


LOADED = {}        # path -> checkpoint read by parse_args, handed to start (a checkpoint can be large: read once)



def given_flags(parser):
    """The dests of the flags given on the command line (not defaults): parsed again with every default
    suppressed, so an absent flag leaves no attribute."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in defaults:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args()
    finally:
        for action, default in defaults.items():
            action.default = default
    return set(vars(given))


def parse_args(parser, method):
    """Parse, take the checkpoint's flags (--resume, --eval_only), fill from the dataset preset, check every
    flag and the output folder before any work, pick the device, seed, and print the resolved arguments."""
    args = parser.parse_args()
    given = given_flags(parser)
    args.method = method
    if args.checkpoint and not args.eval_only:
        fail("--checkpoint is read only with --eval_only; to continue training a run use --resume "
             "(it reads SAVE_DIR/model.pt)")
    if args.eval_only and args.resume:
        fail("--eval_only and --resume exclude each other: --eval_only scores a checkpoint, --resume trains on")
    if args.from_best and not args.resume:
        fail("--from_best goes with --resume (continue a run from its best weights)")
    if args.cross_method and not args.eval_only:
        fail("--cross_method goes with --eval_only (score another method's checkpoint)")
    if args.eval_only:
        take_eval_args(args, given, method)
    elif args.resume:
        take_resume_args(args, given, method)
    preset = {**PRESETS[args.dataset], **(MLP_PRESET if args.image_net == "mlp" else {})}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.oracle:
        take_oracle_sizes(args, given)
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    args.save_dir = args.save_dir or os.path.join("runs", f"{method}-{args.dataset}")
    check_flags(args)
    if args.cuda and not torch.cuda.is_available():
        fail("--cuda was given but PyTorch sees no CUDA GPU here; drop --cuda to run on the CPU")
    args.device = torch.device("cuda" if args.cuda else "cpu")
    check_save_dir(args)
    torch.manual_seed(args.seed)
    print(f"{method}: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
    if args.epochs == 0 and not args.eval_only:
        print("note: --epochs 0 trains nothing: the test scores the initial weights", flush=True)
    return args


def take_eval_args(args, given, method):
    """--eval_only: the model's shape, data and method flags come from the checkpoint; a shape or dataset given
    on the command line must agree with it. Results go next to the checkpoint unless --save_dir is given."""
    if not args.checkpoint:
        fail("--eval_only needs --checkpoint PATH (a model.pt written by these scripts)")
    payload = LOADED[args.checkpoint] = load_checkpoint(args.checkpoint, "cpu")
    saved = payload["args"]
    trained_by = saved.get("method", "?")
    if trained_by != method and not args.cross_method:
        fail(f"{args.checkpoint} was trained by {trained_by}.py; evaluate it with {trained_by}.py, or add "
             f"--cross_method to score its weights with {method}.py's inference")
    for key in MODEL_KEYS:
        if key in given and key in saved and getattr(args, key) != saved[key]:
            fail(f"--{key} {getattr(args, key)} differs from the checkpoint's {saved[key]}: the model and its "
                 f"data come from {args.checkpoint}; drop --{key}")
    own = RUN_FLAGS + ("method", "save_dir", "epochs", "iw_samples", "val_iw_samples", "gaps", "print_every",
                       "plot_posterior", "cuda", "examples")
    for key, value in saved.items():
        if key not in given and key not in own and hasattr(args, key):
            setattr(args, key, value)
    args.save_dir = args.save_dir or os.path.dirname(args.checkpoint) or "."


def take_resume_args(args, given, method):
    """--resume: every flag not given comes from the checkpoint; a given flag may differ from it only if it is
    in RESUME_MAY_CHANGE (and --lr with --from_best)."""
    args.save_dir = args.save_dir or os.path.join("runs", f"{method}-{args.dataset}")
    path = os.path.join(args.save_dir, "model.pt")
    if not os.path.exists(path):
        fail(f"--resume found no checkpoint {path}: --resume continues the run in --save_dir; pass that run's "
             f"folder as --save_dir, or drop --resume to start a new run")
    payload = LOADED[path] = load_checkpoint(path, "cpu")
    saved = payload["args"]
    if saved.get("method") != method:
        fail(f"{path} was trained by {saved.get('method')}.py; resume it with {saved.get('method')}.py")
    may_change = RESUME_MAY_CHANGE + RUN_FLAGS + (("lr",) if args.from_best else ())
    for key in sorted(given):
        if key in saved and key not in may_change and getattr(args, key) != saved[key]:
            how = ("; --lr may change only with --from_best (continue from the best weights with a fresh "
                   "optimiser)") if key == "lr" else f"; drop --{key} to continue, or start a new run in another --save_dir"
            fail(f"--{key} {getattr(args, key)} differs from the run being resumed ({saved[key]}){how}")
    for key, value in saved.items():            # the device is this machine's: never taken from the checkpoint
        if key not in given and key not in RUN_FLAGS + ("method", "save_dir", "cuda") and hasattr(args, key):
            setattr(args, key, value)


def take_oracle_sizes(args, given):
    """--oracle: the decoder is synthetic_oracle's true generator, so the model takes its sizes (the encoder is
    sized from the same flags, as in Kim et al.); a size given on the command line must agree."""
    if args.dataset != "synthetic_oracle":
        fail(f"--oracle needs data whose generator is known (--dataset synthetic_oracle); {args.dataset} has none")
    for key in ORACLE_SIZES:
        true = PRESETS["synthetic_oracle"][key]
        if key in given and getattr(args, key) != true:
            fail(f"--oracle fixes the decoder to the true generator, whose {key} is {true}; drop --{key}")
        setattr(args, key, true)


def check_flags(args):
    """One clear line for a value no run can use, before any data is read."""
    text = args.dataset not in IMAGE_DATASETS
    checks = [
        (args.epochs >= 0, "--epochs must be >= 0 (0: score the initial weights)"),
        (args.train_size >= 0, "--train_size must be >= 0 (0: all training examples)"),
        (args.batch_size >= 1, "--batch_size must be >= 1"),
        (args.lr > 0 and math.isfinite(args.lr), "--lr must be a finite number > 0"),
        (args.clip >= 0, "--clip must be >= 0 (0: off)"),
        (args.latent_dim >= 0, "--latent_dim must be >= 0 (0: no latent)"),
        (args.hidden_dim >= 1, "--hidden_dim must be >= 1"),
        (args.emb_dim >= 1 or not text, "--emb_dim must be >= 1 for text"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (args.warmup >= 0 and args.kl_start >= 0, "--warmup and --kl_start must be >= 0"),
        (args.patience >= 1, "--patience must be >= 1"),
        (args.iw_samples >= 1 and args.val_iw_samples >= 1, "--iw_samples and --val_iw_samples must be >= 1"),
        (args.print_every >= 1, "--print_every must be >= 1 (batches between progress lines)"),
        (args.examples >= 0, "--examples N needs N >= 0 (0: none)"),
        (args.plot_posterior >= 0, "--plot_posterior N needs N >= 0 (0: off)"),
        (args.gaps >= 0 and not (args.gaps and args.latent_dim == 0 and not args.oracle),
         "--gaps N needs N >= 0 and a latent (--latent_dim > 0)"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)


def check_save_dir(args):
    """Before any work: the output folder can be created and written, and a new run never lands in a folder
    that holds another run (its checkpoint, log or metrics would be mixed or lost)."""
    folder = args.save_dir
    if os.path.exists(folder) and not os.path.isdir(folder):
        fail(f"--save_dir {folder} is a file, not a folder; pass a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write_test")
        os.close(handle)
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to --save_dir {folder} ({e.strerror or e}); pass a writable folder")
    if args.resume or args.eval_only:
        return
    log = os.path.join(folder, "log.jsonl")
    held = [name for name in ("model.pt", "metrics.json") if os.path.exists(os.path.join(folder, name))]
    held += ["log.jsonl"] if os.path.exists(log) and os.path.getsize(log) > 0 else []
    if held:
        fail(f"{folder} already holds a run ({', '.join(held)}); add --resume to continue it, or pass a new "
             f"--save_dir (nothing was changed)")


# ====================================================================================================
# 7. Training: optimisers, gradient clipping, KL annealing, the lr schedule, the progress meter.
# ====================================================================================================

def make_optimizer(params, args):
    """SGD or Adam over the parameters that require gradients (never --oracle's frozen generator). With none
    (svi.py --oracle), an empty parameter group keeps the lr schedule and the checkpoints working."""
    params = [p for p in params if p.requires_grad] or [{"params": []}]
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr)
    return torch.optim.SGD(params, lr=args.lr)


def clip_grad(modules, clip):
    """Clip the gradient norm of all the modules' parameters together, as both papers' code does."""
    if clip > 0:
        nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], clip)


def kl_weight(args, step, steps_per_epoch):
    """KL annealing: linear from kl_start to 1 over `warmup` epochs, updated every step."""
    if args.warmup <= 0:
        return 1.0
    return min(1.0, args.kl_start + (1.0 - args.kl_start) * step / (args.warmup * steps_per_epoch))


MAX_DECAYS = 5


def schedule(state, val_loss, optimizers, patience):
    """The papers' lr schedule: halve the lr of every optimiser when validation has not improved for
    `patience` epochs (end_epoch stops training after 5 halvings). Returns whether val is the best so far."""
    best = val_loss < state["best_val"]
    if best:
        state["best_val"], state["worse_epochs"] = val_loss, 0
    else:
        state["worse_epochs"] += 1
        if state["worse_epochs"] >= patience:
            state["lr"] /= 2
            state["decays"] += 1
            state["worse_epochs"] = 0
            for opt in optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = state["lr"]
    return best


def diverged(args, what, value, epoch, lr=None):
    """Stop a run whose loss is no longer finite. Nothing of the diverged epoch is saved, so model.pt (if any)
    holds the last good epoch, and the best weights can be trained on with a lower lr."""
    checkpoint = os.path.join(args.save_dir, "model.pt")
    if epoch > 1 and os.path.exists(checkpoint):
        hint = (f"the diverged weights were not saved; {checkpoint} holds epoch {epoch - 1}: continue from the best "
                f"weights with a lower lr: --resume --from_best --lr LOWER"
                + (f" (the lr was {lr:g})" if lr is not None else ""))
    else:
        hint = "no checkpoint was written: start again with a lower --lr (or --clip)"
    fail(f"{what} became {value} in epoch {epoch}; {hint}")


class Meter:
    """An epoch's training quantities, per example, summed on the device (no host sync per step) and printed
    by name every `print_every` steps: meter.add(kl_weight, neg_elbo=..., rec=..., kl=...), each a [batch]
    tensor. Their means per example go to log.jsonl ("train"); a name neg_X prints as -X."""

    def __init__(self, args, epoch):
        self.args, self.epoch, self.start = args, epoch, time.time()
        self.end = self.start                      # time of the last training step: train_seconds excludes validation
        self.names, self.sums, self.examples, self.steps = [], None, 0, 0

    def add(self, kl_weight, **per_example):
        sums = torch.stack([v.detach().sum() for v in per_example.values()])
        self.names, self.sums = list(per_example), sums if self.sums is None else self.sums + sums
        self.examples += len(next(iter(per_example.values())))
        self.steps += 1
        self.end = time.time()
        if self.steps % self.args.print_every == 0:
            shown = " ".join(f"{name.replace('neg_', '-')} {value:.3f}" for name, value in self.result().items())
            print(f"epoch {self.epoch} step {self.steps}: {shown} kl_weight {kl_weight:.3f} "
                  f"{self.examples / (time.time() - self.start):.0f} examples/s", flush=True)

    def result(self):
        """{name: mean per example}; a value that is not finite stops the run (diverged)."""
        if self.sums is None:
            return {}
        result = dict(zip(self.names, (self.sums / self.examples).tolist()))
        for name, value in result.items():
            if not math.isfinite(value):
                diverged(self.args, f"training {name.replace('neg_', '-')}", value, self.epoch)
        return result


# ====================================================================================================
# 8. Runs on disk: the training state, checkpoints (written atomically), log.jsonl, metrics.json.
# ====================================================================================================

def new_state(args):
    return {"epoch": 0, "step": 0, "lr": args.lr, "best_val": math.inf, "worse_epochs": 0,
            "decays": 0, "train_seconds": 0.0}


def keep_freed_memory():
    """Has glibc's malloc serve every allocation from its heap and keep freed memory for reuse. By default it
    maps each block over 32 MB (a [tokens, vocabulary] array of logits) fresh from the kernel and unmaps it when
    freed, so every use pays a page fault per 4 KB page: 15% of a CPU training step at Yahoo size. The cost:
    the process holds on to its peak memory. Linux with glibc only; elsewhere nothing changes. Returns whether
    it applied."""
    m_trim_threshold, m_mmap_max = -1, -4                    # mallopt's parameter numbers (malloc.h)
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 30))
    except (OSError, AttributeError):
        return False


def start(args, dataset, modules, optimizers):
    """A fresh training state, or the one saved in SAVE_DIR/model.pt with --resume (a finished run is not
    trained further: only a final test that did not complete is run again). With --eval_only, loads the
    checkpoint's best weights instead. parse_args has checked the folder and the flags."""
    if args.device.type == "cpu":
        keep_freed_memory()
    remove_stale_temporaries(args.save_dir)
    state = new_state(args)
    log_path = os.path.join(args.save_dir, "log.jsonl")
    if not (args.resume or args.eval_only):
        open(log_path, "w").close()               # parse_args refused a folder that holds a run
        return state
    path = args.checkpoint if args.eval_only else os.path.join(args.save_dir, "model.pt")
    payload = LOADED.pop(path, None) or load_checkpoint(path, args.device)
    if payload["vocab"] != getattr(dataset, "vocab", None):
        saved = payload["args"]
        fail(f"{path} was trained with another vocabulary than {args.data_dir} gives with --train_size "
             f"{args.train_size}; use the training run's --data_dir {saved.get('data_dir')} and --train_size "
             f"{saved.get('train_size')}")
    if args.eval_only:
        load_modules(path, payload, "best_modules", modules)
        return {**payload["state"], "trained_by": payload["args"].get("method", "?")}
    state = {**payload["state"], "best_modules": payload["best_modules"]}
    epoch, metrics_path = state["epoch"], os.path.join(args.save_dir, "metrics.json")
    if state["decays"] >= MAX_DECAYS or epoch >= args.epochs:
        why = f"after {MAX_DECAYS} lr halvings" if state["decays"] >= MAX_DECAYS else f"at --epochs {args.epochs}"
        if os.path.exists(metrics_path):
            print(f"{path}: the run finished {why} (epoch {epoch}) and wrote {metrics_path}: nothing to do "
                  f"(--eval_only --checkpoint {path} scores it again, into a new file)", flush=True)
            raise SystemExit(0)
        print(f"{path}: the run finished {why} (epoch {epoch}); its final test did not complete: "
              f"running only the final test", flush=True)
    elif os.path.exists(metrics_path):             # trained on to a larger --epochs: keep the earlier result
        kept = free_name(args.save_dir, f"metrics_epoch{epoch}", ".json")
        os.replace(metrics_path, kept)
        print(f"training continues to --epochs {args.epochs}; the test metrics after epoch {epoch} moved to {kept}",
              flush=True)
    load_modules(path, payload, "best_modules" if args.from_best else "modules", modules)
    if args.from_best:                             # optimisers are new, made with --lr
        state["lr"], state["worse_epochs"] = args.lr, 0
        print(f"resuming from the best weights (epoch {state.get('best_epoch', '?')}, validation -elbo "
              f"{state['best_val']:.3f}) with a fresh optimiser at lr {args.lr:g}", flush=True)
    else:
        for name, opt in optimizers.items():
            opt.load_state_dict(payload["optimizers"][name])
    set_rng_states(payload["rng"], dataset)
    keep_log_until(log_path, epoch)
    print(f"resumed from {path} after epoch {epoch}", flush=True)
    return state


def epochs(args, state):
    """The epochs still to train: after the state's epoch up to --epochs, none after 5 lr halvings (or a run
    that already finished them), none with --eval_only. end_epoch advances state["epoch"]."""
    while not args.eval_only and state["epoch"] < args.epochs and state["decays"] < MAX_DECAYS:
        yield state["epoch"] + 1


def end_epoch(args, state, meter, val, *, dataset, modules, optimizers, log=None):
    """After validation (val: evaluate's dict): the lr schedule, the log line (the meter's training means,
    validation, and any other named quantities in `log`), the checkpoint (the latest state and the best
    weights). A non-finite loss stops the run before anything is saved."""
    epoch, train = meter.epoch, meter.result()
    for key in ("neg_elbo", "nll"):
        if not math.isfinite(val[key]):
            diverged(args, f"validation {key.replace('_', '-')}", val[key], epoch, state["lr"])
    state["epoch"] = epoch
    state["train_seconds"] += meter.end - meter.start
    best = schedule(state, val["neg_elbo"], optimizers, args.patience)
    current = {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
               for name, m in modules.items()}
    if best:
        state["best_modules"], state["best_epoch"] = current, epoch
    record = {"epoch": epoch, "lr": state["lr"], "kl_weight": kl_weight(args, state["step"], dataset.steps_per_epoch(args.batch_size)),
              "seconds": time.time() - meter.start, "train": train,
              "val": {k: v for k, v in val.items() if k not in ("iw_samples", "num_examples")}, **(log or {})}
    log_path = os.path.join(args.save_dir, "log.jsonl")
    save_checkpoint(os.path.join(args.save_dir, "model.pt"), {
        "format": CHECKPOINT_FORMAT, "args": {k: v for k, v in vars(args).items() if k != "device"},
        "vocab": getattr(dataset, "vocab", None), "modules": current,
        "state": {k: v for k, v in state.items() if k != "best_modules"},
        "best_modules": state["best_modules"],
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "rng": rng_states(dataset)}, before_rename=lambda: append_line(log_path, record))
    shown = " ".join(f"{name.replace('neg_', '-')} {value:.3f}" for name, value in list(train.items())[:1])
    print(f"epoch {epoch}: train {shown} | val nll {val['nll']:.3f} "
          f"-elbo {val['neg_elbo']:.3f} kl {val['kl']:.3f} mi {val['mi']:.3f} au {val['au']} "
          f"| lr {state['lr']:g}{' (best)' if best else ''}", flush=True)


def final_test(args, state, infer, decoder, dataset, modules):
    """Evaluate the best weights on the test split with iw_samples; print, then write metrics.json (with
    --eval_only a new file metrics_eval_METHOD_epochN.json that names the checkpoint)."""
    if "best_modules" in state:                    # training ran: test the best weights
        for name, module in modules.items():
            module.load_state_dict(state["best_modules"][name])
    for m in modules.values():
        m.eval()
    plot_posterior(args, state["step"], infer, decoder, dataset, final=True)
    test = evaluate(infer, decoder, dataset.batches("test", args.batch_size), args.iw_samples)
    metrics = {"method": args.method, "dataset": args.dataset, **test,
               "train_seconds": state["train_seconds"]}
    if args.gaps:                                  # an extra key; the others stay as they are
        metrics["gaps"] = gaps(infer, decoder, dataset.batches("test", args.batch_size), args.gaps,
                               args.latent_dim, args.iw_samples, args.seed)
    if args.eval_only:                             # extra keys: which weights these are
        metrics.update(checkpoint=args.checkpoint, checkpoint_epoch=state["epoch"], trained_by=state["trained_by"])
    print("test: " + json.dumps(metrics), flush=True)
    if args.eval_only:
        other = f"_from_{state['trained_by']}" if state["trained_by"] != args.method else ""
        path = write_new_json(args.save_dir, f"metrics_eval_{args.method}{other}_epoch{state['epoch']}", metrics)
    else:
        path = os.path.join(args.save_dir, "metrics.json")
        write_json(path, metrics)
    print(f"wrote {path}", flush=True)
    if dataset.kind == "text" and args.examples:
        lines = text_examples(infer, decoder, dataset, args.seed, args.examples)
        stem = f"examples_eval_{args.method}" if args.eval_only else "examples"
        examples = free_name(args.save_dir, stem, ".txt") if args.eval_only else os.path.join(args.save_dir, "examples.txt")
        with open(examples, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines[:4]) + f"\n... wrote {examples}", flush=True)
        if args.latent_dim > 0 and isinstance(decoder, LSTMDecoder):
            report, page = saliency_report(infer, modules.get("encoder"), decoder, dataset, args.examples)
            stem = f"saliency_eval_{args.method}" if args.eval_only else "saliency"
            json_path = free_name(args.save_dir, stem, ".json") if args.eval_only else os.path.join(args.save_dir, "saliency.json")
            with open(json_path, "w") as f:
                json.dump(report, f, indent=1)
            with open(json_path[:-len(".json")] + ".html", "w") as f:
                f.write(page)
            print(f"wrote {json_path} and its .html", flush=True)
    if dataset.kind == "image" and args.latent_dim > 0 and args.examples:
        written = []
        for name, rows in image_examples(infer, decoder, dataset, args.seed, args.examples).items():
            path = free_name(args.save_dir, f"{name}_eval_{args.method}", ".png") if args.eval_only else \
                os.path.join(args.save_dir, f"{name}.png")
            write_png(path, rows)
            written.append(path)
        print(f"wrote {', '.join(written)}", flush=True)
    if not args.eval_only:
        draw_curves([args.save_dir], os.path.join(args.save_dir, "curves.png"), quiet_without_matplotlib=True)
    return metrics


CHECKPOINT_FORMAT = "vi-checkpoint-1"


def first_line(error):
    """An exception as one line (torch's write errors span several)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def save_checkpoint(path, payload, before_rename=None):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint. before_rename
    runs between the two: end_epoch appends the epoch's log line there, so a kill at any moment leaves the log
    at most one epoch ahead of model.pt, and --resume drops that line. A failed write (disk full) removes the
    temporary file, leaves model.pt as it was and stops with one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(payload, tmp)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:       # torch reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        fail(f"cannot write the checkpoint {path} ({first_line(e)}); model.pt keeps the last epoch it held: "
             f"free space, then continue with --resume")


def load_checkpoint(path, device):
    if os.path.isdir(path):
        fail(f"checkpoint {path} is a folder; pass the model.pt inside it ({os.path.join(path, 'model.pt')})")
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist; train first or pass the path of a model.pt")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); it is not a model.pt written by these scripts")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        fail(f"{path} is not a checkpoint written by these scripts (no '{CHECKPOINT_FORMAT}' marker)")
    return payload


def load_modules(path, payload, which, modules):
    """The weights `which` ('modules': latest, 'best_modules': best) of a checkpoint into modules."""
    saved, trained_by = payload[which], payload["args"].get("method", "?")
    for name, module in modules.items():
        if name not in saved:
            fail(f"{path} (trained by {trained_by}.py) has no {name}, only {', '.join(sorted(saved))}; "
                 f"evaluate it with {trained_by}.py")
        try:
            module.load_state_dict(saved[name])
        except RuntimeError as e:
            fail(f"{path} does not fit this model ({first_line(e)}); evaluate it with {trained_by}.py")


def rng_states(dataset):
    return {"torch": torch.get_rng_state(), "data": dataset.generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states, dataset):
    torch.set_rng_state(states["torch"].cpu())
    dataset.generator.set_state(states["data"].cpu())
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def remove_stale_temporaries(folder):
    """Partial model.pt.tmpPID / metrics.json.tmpPID files of processes that no longer run (killed while
    writing): they can be as large as a checkpoint. A file of a live process is left alone."""
    for tmp in glob.glob(os.path.join(glob.escape(folder), "*.tmp*")):
        name, _, pid = os.path.basename(tmp).rpartition(".tmp")
        if name not in ("model.pt", "metrics.json") or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue                               # still running
        except ProcessLookupError:
            pass
        except OSError:                            # e.g. another user's process: alive
            continue
        with contextlib.suppress(OSError):
            os.remove(tmp)
            print(f"removed {tmp}, left by process {pid} that stopped while writing it", flush=True)


def keep_log_until(path, epoch):
    """--resume: keep the log lines of the epochs the checkpoint holds. A later line (written just before a kill
    stopped the checkpoint's rename) is dropped, as is a line cut off by a kill (with a warning)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, errors="replace") as f:
        for line in f.read().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                print(f"warning: {path}: dropped a line cut off by an interrupted write ({line[:40]!r}...)", flush=True)
                continue
            if record.get("epoch", math.inf) <= epoch:
                kept.append(line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def append_line(path, record):
    """One JSON line, flushed to disk (it must be there before the checkpoint's rename)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path, obj):
    """metrics.json of a training run: temporary file, then rename (never half written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        fail(f"cannot write {path} ({e.strerror or e}); the test metrics are printed above")


def write_new_json(folder, stem, obj):
    """A new file FOLDER/STEM.json, or STEM_2.json, STEM_3.json ... if taken: never over an existing file."""
    for n in range(1, 10 ** 6):
        path = os.path.join(folder, f"{stem}{'' if n == 1 else f'_{n}'}.json")
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        except OSError as e:
            fail(f"cannot write {path} ({e.strerror or e}); the test metrics are printed above")
        with os.fdopen(handle, "w") as f:
            json.dump(obj, f, indent=1)
        return path


def free_name(folder, stem, suffix):
    """FOLDER/STEM+SUFFIX, or STEM_2+SUFFIX ... : the first name not taken."""
    for n in range(1, 10 ** 6):
        path = os.path.join(folder, f"{stem}{'' if n == 1 else f'_{n}'}{suffix}")
        if not os.path.exists(path):
            return path


# ====================================================================================================
# 9. Reports: training curves from log.jsonl, and a table of the test metrics over seeds.
#    python common.py --curves runs/vae-synthetic runs/lagging-synthetic --out curves.png
#    python common.py --table runs/table1/*        (folders named METHOD-seedN: one row per METHOD)
# ====================================================================================================

CURVES = [("-ELBO (train, val) and val NLL", ("train", "neg_elbo"), ("train", "neg_bound"), ("val", "neg_elbo"),
           ("val", "nll")),
          ("KL (train, val)", ("train", "kl"), ("val", "kl")), ("MI (val)", ("val", "mi")),
          ("active units (val)", ("val", "au")), ("learning rate", ("lr",)), ("KL weight", ("kl_weight",))]


def read_log(folder):
    """The records of FOLDER/log.jsonl (a line cut off by a kill is skipped)."""
    records = []
    with contextlib.suppress(OSError), open(os.path.join(folder, "log.jsonl"), errors="replace") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def draw_curves(folders, path, quiet_without_matplotlib=False):
    """One PNG of the training curves of one or more runs (each run a colour, each quantity a panel)."""
    runs = [(os.path.basename(os.path.normpath(folder)), read_log(folder)) for folder in folders]
    runs = [(name, records) for name, records in runs if records]
    if not runs:
        if not quiet_without_matplotlib:
            fail(f"no log.jsonl with epochs in {', '.join(folders)}; pass run folders (--save_dir of a training run)")
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if quiet_without_matplotlib:
            print("note: no curves.png (matplotlib is not installed: pip install matplotlib)", flush=True)
            return None
        fail("drawing curves needs matplotlib (pip install matplotlib)")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, *keys) in zip(axes.flat, CURVES):
        for colour, (name, records) in enumerate(runs):
            for style, key in zip(("-", "--", ":", "-."), keys):
                points = [(r["epoch"], value) for r in records
                          if (value := r.get(key[0]) if len(key) == 1 else r.get(key[0], {}).get(key[1])) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{colour}", marker=".",
                            label=f"{name} {'/'.join(key)}" if len(keys) > 1 or len(runs) > 1 else None)
        ax.set(title=title, xlabel="epoch")
        if title == "learning rate":
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}", flush=True)
    return path


def words(vocab, tokens):
    """Token ids (a decoded row, or a sentence with <s> and </s>) as text, up to the first </s>."""
    out = []
    for t in tokens:
        word = vocab[t]
        if word == "</s>":
            break
        if word != "<s>":
            out.append(word)
    return " ".join(out) or "(empty)"


@torch.no_grad()
def text_examples(infer, decoder, dataset, seed, count=8):
    """What a text model does, as lines of text: sentences from the prior (sampled and greedy), greedy
    reconstructions of test sentences from the mean of the method's own q(z|x), and the greedy sentences along
    the line between two test sentences' posterior means. Uses a local random stream (training's is untouched)."""
    vocab, x = dataset.vocab, max(dataset.by_length["test"].values(), key=len)[:count]   # one length: a batch
    device, d = x.device, decoder.latent_dim
    generator = torch.Generator(device=device).manual_seed(seed)
    length = max(max(t) for t in (dataset.by_length[s].keys() for s in dataset.by_length)) + 5
    first = torch.full((count,), vocab.index("<s>"), device=device)
    z = torch.randn(count, d, generator=generator, device=device)
    lines = ["# sentences from the prior p(z), sampled"]
    lines += [words(vocab, row) for row in decoder.sample(z, first, length, generator=generator).tolist()]
    lines += ["", "# the same z, greedy"] + [words(vocab, row) for row in decoder.sample(z, first, length, greedy=True).tolist()]
    if d == 0:
        return lines
    mean = infer(x)[0].detach()                  # count test sentences, or fewer
    lines += ["", "# test sentence  ->  greedy reconstruction from the mean of q(z|x)"]
    lines += [f"{words(vocab, a)}  ->  {words(vocab, b)}"
              for a, b in zip(x.tolist(), decoder.sample(mean, first[:len(x)], length, greedy=True).tolist())]
    if len(x) < 2:
        return lines
    steps = count
    t = torch.linspace(0, 1, steps, device=device).unsqueeze(1)
    path = (1 - t) * mean[0] + t * mean[1]
    lines += ["", f"# interpolation between the posterior means of test sentences 1 and 2 ({steps} steps)",
              f"# from: {words(vocab, x[0].tolist())}", f"# to:   {words(vocab, x[1].tolist())}"]
    lines += [words(vocab, row) for row in decoder.sample(path, first[:1].expand(steps), length, greedy=True).tolist()]
    return lines


def write_png(path, rows):
    """A grey-level PNG from rows of images in [0, 1]: rows is a list of lists of [28, 28] tensors, drawn as a
    grid with a 2-pixel grey border (standard library only: zlib)."""
    import struct
    import zlib
    size, pad, width = 28, 2, max(len(r) for r in rows)
    grid = torch.full((len(rows) * (size + pad) + pad, width * (size + pad) + pad), 0.5)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (size + pad), pad + j * (size + pad)
            grid[top:top + size, left:left + size] = 1 - image.float().cpu()       # ink dark on white
    pixels = (grid * 255).round().to(torch.uint8).repeat_interleave(2, 0).repeat_interleave(2, 1)   # 2x: visible
    raw = b"".join(b"\x00" + bytes(line.tolist()) for line in pixels)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


@torch.no_grad()
def image_examples(infer, decoder, dataset, seed, count=8):
    """What an image model does, as grids: {name: rows of images}. samples: `count` images from the prior;
    reconstructions: `count` test images (top) over images drawn from p(x|z) at the mean of the method's own
    q(z|x) (bottom); interpolation: two test images at the ends, between them images drawn at `count` points
    on the line between their posterior means. All drawn in one call of decoder.sample (a PixelCNN samples
    pixel by pixel: 784 passes of the network, whatever the number of images)."""
    x = dataset.batches("test", count)[0][:count]
    mean, device = infer(x)[0].detach(), x.device
    generator = torch.Generator(device=device).manual_seed(seed)
    prior = torch.randn(count, mean.shape[1], generator=generator, device=device)
    t = torch.linspace(0, 1, count, device=device).unsqueeze(1)
    path = (1 - t) * mean[0] + t * mean[-1]
    drawn = decoder.sample(torch.cat([prior, mean, path]), generator)[:, 0].split([count, len(mean), count])
    grids = {"samples": [list(drawn[0])], "reconstructions": [list(x[:, 0]), list(drawn[1])]}
    if len(x) >= 2:
        grids["interpolation"] = [[x[0, 0], *drawn[2], x[-1, 0]]]
    return grids


def saliency(infer, encoder, decoder, x):
    """How much the model uses z, token by token, for sentences x [m, T] of one length (after Kim et al. 2018's
    saliency analysis, as this project defines it; docs/design.md):
      output[i, t] = || d log p(x_t | x_<t, z) / dz ||_2 at z = the mean of the method's own q(z|x_i), for each
                     predicted token (</s> included): how much each output token depends on z;
      input[i, t]  = || d mean / d e_t ||_F, e_t the encoder's embedding of token t (<s> included): how much
                     each input token moves the encoder's mean (None without an encoder, as for svi.py).
    Computed without a loop over tokens: each sentence is repeated once per token (per latent dimension for
    the input side), and copy t keeps only token t's term, so one backward pass gives every token's gradient."""
    m, length = x.shape
    mean = infer(x)[0].detach()
    d = mean.shape[1]
    with torch.enable_grad():
        z = mean.repeat_interleave(length - 1, 0).requires_grad_()                  # [m * (T - 1), d]
        inputs = x.repeat_interleave(length - 1, 0)
        logits, _ = decoder.logits(inputs[:, :-1], z)
        token_log_p = logits.log_softmax(-1).gather(-1, inputs[:, 1:, None])[..., 0]  # [m * (T - 1), T - 1]
        own = torch.eye(length - 1, device=x.device).repeat(m, 1)                    # copy t keeps token t
        grad, = torch.autograd.grad((token_log_p * own).sum(), z)
        output = grad.view(m, length - 1, d).norm(dim=-1)
        inputs_side = None
        if isinstance(encoder, LSTMEncoder):
            emb = encoder.embed(x).detach().repeat_interleave(d, 0).requires_grad_()  # [m * d, T, emb]
            _, (h, _) = encoder.lstm(emb)
            means = encoder.to_params(h[-1]).chunk(2, -1)[0]                          # [m * d, d]
            grad, = torch.autograd.grad((means * torch.eye(d, device=x.device).repeat(m, 1)).sum(), emb)
            inputs_side = grad.view(m, d, length, -1).pow(2).sum((1, 3)).sqrt()       # [m, T]
    return output, inputs_side


def saliency_report(infer, encoder, decoder, dataset, count=10):
    """saliency() on up to `count` test sentences of the most common length: (JSON-ready dict, HTML page)."""
    vocab = dataset.vocab
    x = max(dataset.by_length["test"].values(), key=len)[:count]
    output, inputs = saliency(infer, encoder, decoder, x)
    rows = []
    for i, sentence in enumerate(x.tolist()):
        tokens = [vocab[t] for t in sentence]
        rows.append({"input_tokens": tokens, "input": None if inputs is None else inputs[i].tolist(),
                     "output_tokens": tokens[1:], "output": output[i].tolist()})

    def shade(tokens, values):
        top = max(values) or 1.0
        return " ".join(f'<span style="background: rgba(220, 40, 40, {v / top:.2f})" title="{v:.3g}">'
                        f'{html.escape(t)}</span>' for t, v in zip(tokens, values))
    page = ["<html><meta charset='utf-8'><body style='font-family: monospace'>",
            "<p>Saliency: output tokens shaded by ||d log p(x_t | x_&lt;t, z) / dz|| at the mean of q(z|x); input tokens by "
            "||d mean / d embedding||. Each row scaled to its own maximum (hover for the value).</p>"]
    for row in rows:
        if row["input"] is not None:
            page.append(f"<p>input: {shade(row['input_tokens'], row['input'])}<br>")
        page.append(f"output: {shade(row['output_tokens'], row['output'])}</p>")
    page.append("</body></html>")
    return {"definition": saliency.__doc__.split("\n", 1)[1], "sentences": rows}, "\n".join(page)


TABLE_KEYS = ("nll", "neg_elbo", "rec", "kl", "mi", "au", "ppl")


def seed_table(folders):
    """A markdown table of the test metrics of many runs, mean +- standard deviation (over runs, n - 1) per row.
    Runs are grouped by folder name with a trailing -seedN / _seedN removed (e.g. vae-seed1, vae-seed2 -> vae);
    each run's metrics.json must be there."""
    groups = {}
    for folder in folders:
        path = os.path.join(folder, "metrics.json")
        try:
            with open(path) as f:
                metrics = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); pass folders of finished runs")
        name = re.sub(r"[-_]seed\d+$", "", os.path.basename(os.path.normpath(folder)))
        groups.setdefault((name, metrics["dataset"]), []).append(metrics)
    lines = ["| run | dataset | runs | " + " | ".join(TABLE_KEYS) + " |", "|---" * (len(TABLE_KEYS) + 3) + "|"]
    for (name, dataset), runs in groups.items():
        cells = []
        for key in TABLE_KEYS:
            values = torch.tensor([float(r[key]) for r in runs if r.get(key) is not None], dtype=torch.float64)
            if len(values) == 0:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.2f}")
            else:
                cells.append(f"{values.mean():.2f} +- {values.std():.2f}")
        lines.append(f"| {name} | {dataset} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Reports over finished runs (folders written by the method scripts).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--curves", nargs="+", metavar="RUN", help="draw the runs' training curves into one PNG")
    mode.add_argument("--table", nargs="+", metavar="RUN", help="print a markdown table of the runs' test metrics, "
                                                                "mean +- sd over the seeds of each run name")
    parser.add_argument("--out", default=None, help="--curves: the PNG (default curves.png); --table: also write it here")
    cli = parser.parse_args()
    if cli.curves:
        draw_curves(cli.curves, cli.out or "curves.png")
    else:
        table = seed_table(cli.table)
        print(table)
        if cli.out:
            with open(cli.out, "w") as f:
                f.write(table + "\n")

