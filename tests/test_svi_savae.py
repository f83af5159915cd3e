"""svi.py and savae.py: the SA-VAE gradient against autograd through the unrolled SVI steps (float64),
savae with 0 steps == vae exactly, the two ablations' objectives, per-example SVI, and smoke runs.

The training steps under test are the scripts' own: `load_script` runs a script with --epochs 0
(setup and a test evaluation only) and returns its globals, so train_step, encoder, decoder and args are
the objects the script trains with.
"""
import os
import runpy
import sys

import pytest
import torch
import torch.distributions as D

import common
from conftest import ROOT, TINY, TINY_TEXT, read_metrics, start_script


def load_script(script, monkeypatch, tmp_path, text_dir, *argv):
    monkeypatch.setattr(sys, "argv", [script, "--dataset", "text", "--data_dir", str(text_dir), *TINY_TEXT,
                                      "--epochs", "0", "--iw_samples", "2", "--save_dir", str(tmp_path / script),
                                      *map(str, argv)])
    return runpy.run_path(os.path.join(ROOT, script), run_name="__test__")


def batch_of(ns, size=4):
    return next(x for x in ns["dataset"].batches("train", size) if len(x) == size)


def grads(modules):
    return [p.grad.clone() for m in modules for p in m.parameters()]


def rel_error(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


def unrolled(ns, x, kl_weight, seed, create_graph=True):
    """The SA-VAE loss by plain autograd through K differentiable SVI steps (create_graph), written out here
    (Kim et al. 2018, Alg. 2 forward loop, per-sentence -ELBO sums and per-sentence clipping), with the
    script's random draws in the script's order: the local generator's seed, each step's eps then dropout
    masks from it, then the final eps and masks. create_graph False cuts the steps out of the graph."""
    encoder, decoder, args = ns["encoder"], ns["decoder"], ns["args"]
    torch.manual_seed(seed)
    lam = list(encoder(x))
    generator = torch.Generator(x.device).manual_seed(int(torch.randint(2 ** 62, ())))
    velocity = [torch.zeros_like(t) for t in lam]
    for _ in range(args.svi_steps):
        z = common.reparameterize(*lam, 1, generator)
        f = (-decoder.log_prob(x, z, generator)[:, 0] + kl_weight * ns["prior"].kl(*lam)).sum()
        g = torch.autograd.grad(f, lam, create_graph=create_graph)
        g = [gi * (args.svi_clip / gi.norm(dim=-1, keepdim=True)).clamp(max=1) for gi in g]
        velocity = [args.momentum * v - gi for v, gi in zip(velocity, g)]
        lam = [t + args.svi_lr * v for t, v in zip(lam, velocity)]
    z = common.reparameterize(*lam)
    loss = (-decoder.log_prob(x, z)[:, 0] + kl_weight * ns["prior"].kl(*lam)).mean()
    return torch.autograd.grad(loss, [*encoder.parameters(), *decoder.parameters()])


@pytest.mark.parametrize("hvp,tolerance", [("exact", 1e-8), ("central", 1e-6)])
def test_savae_gradient_is_autograd_through_the_unrolled_steps(monkeypatch, tmp_path, text_dir, hvp, tolerance):
    # a large SVI step and a small clip: the steps matter and some sentences' gradients are clipped
    ns = load_script("savae.py", monkeypatch, tmp_path, text_dir, "--hvp", hvp, "--svi_steps", "3",
                     "--svi_lr", "0.5", "--svi_clip", "0.4", "--dropout", "0.5")
    encoder, decoder, args = ns["encoder"].double(), ns["decoder"].double(), ns["args"]
    g = torch.Generator().manual_seed(0)
    for p in [*encoder.parameters(), *decoder.parameters()]:       # weights large enough that z matters
        torch.nn.init.uniform_(p, -0.5, 0.5, generator=g)
    args.clip = 0                                                    # compare raw gradients
    encoder.train(), decoder.train()                                 # dropout on: its masks must be replayed
    x = batch_of(ns)
    expected = unrolled(ns, x, 0.7, seed=5)
    cut = unrolled(ns, x, 0.7, seed=5, create_graph=False)
    torch.manual_seed(5)
    ns["train_step"](x, 0.7)
    got = grads([encoder, decoder])
    n = len(list(encoder.parameters()))
    for part in (slice(0, n), slice(n, None)):                       # encoder, decoder
        assert rel_error(got[part], expected[part]) < tolerance, (hvp, rel_error(got[part], expected[part]))
        assert rel_error(cut[part], expected[part]) > 1e-2           # the terms through the steps matter


@pytest.mark.parametrize("hvp,tolerance", [("central", 2e-3), ("exact", 1e-5)])
def test_savae_gradient_in_float32_where_clipping_acts(monkeypatch, tmp_path, hvp, tolerance):
    """In float32, the dtype training runs in, with savae.py's default SVI flags (K = 20, lr 1/32, momentum
    0.5, clip 5): Kim et al.'s synthetic_oracle data, its sharp true generator made trainable, an untrained
    encoder. Many sentences' SVI gradients are clipped there, some not (asserted). Both the encoder's and
    the decoder's gradients must match autograd through the unrolled steps (same dtype). The old default
    (one-sided differences, r = 1e-5, adjoints clipped to svi_clip / B) was 60-95% off here.
    Measured: central 1.0e-4 (encoder) and 4.3e-4 (decoder) on the 50-sentence batch of
    ../shared/checks/savae_gradient.py; exact 3e-7."""
    monkeypatch.setattr(sys, "argv", ["savae.py", "--dataset", "synthetic_oracle", "--train_size", "100", "--oracle",
                                      "--clip", "0", "--epochs", "0", "--iw_samples", "1", "--hvp", hvp,
                                      "--save_dir", str(tmp_path)])
    ns = runpy.run_path(os.path.join(ROOT, "savae.py"), run_name="__test__")
    encoder, decoder = ns["encoder"], ns["decoder"].requires_grad_(True)
    encoder.train(), decoder.train()
    x = ns["dataset"].batches("train", 20)[0]
    trace = []
    ns["svi_steps"](x, *encoder(x), 1.0, trace)
    clipped = torch.stack([(g.norm(dim=-1) > 5).float().mean() for _, grads, _ in trace for g in grads])
    assert clipped.max() > 0.2 and clipped.min() < 1                 # clipping acts, on some sentences only
    expected = unrolled(ns, x, 1.0, seed=3)
    cut = unrolled(ns, x, 1.0, seed=3, create_graph=False)
    for p in [*encoder.parameters(), *decoder.parameters()]:
        p.grad = None
    torch.manual_seed(3)
    ns["train_step"](x, 1.0)                     # --clip 0: .grad holds the raw gradient after the step
    got = grads([encoder, decoder])
    n = len(list(encoder.parameters()))
    for part in (slice(0, n), slice(n, None)):                       # encoder, decoder
        assert rel_error(got[part], expected[part]) < tolerance, (hvp, rel_error(got[part], expected[part]))
        assert rel_error(cut[part], expected[part]) > 1e-2           # the terms through the steps matter


@pytest.mark.parametrize("hvp", ["exact", "central"])
def test_zero_svi_steps_is_vae_exactly(monkeypatch, tmp_path, text_dir, hvp):
    vae = load_script("vae.py", monkeypatch, tmp_path, text_dir, "--dropout", "0.5")
    savae = load_script("savae.py", monkeypatch, tmp_path, text_dir, "--dropout", "0.5", "--svi_steps", "0",
                        "--hvp", hvp)
    x = batch_of(vae, 3)                                             # a partial batch: 1/3 is not exact in binary
    results = []
    for ns in (vae, savae):
        ns["encoder"].train(), ns["decoder"].train()
        torch.manual_seed(7)
        rec, kl = ns["train_step"](x, 0.3)
        results.append([rec, kl, *grads([ns["encoder"], ns["decoder"]]),
                        *[p.detach() for p in ns["optimizer"].param_groups[0]["params"]]])
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["vae+svi", "vae+svi+kl"])
def test_ablations_train_encoder_at_lambda_0_and_decoder_at_lambda_k(monkeypatch, tmp_path, text_dir, variant):
    ns = load_script("savae.py", monkeypatch, tmp_path, text_dir, "--variant", variant, "--svi_steps", "3",
                     "--svi_lr", "0.5", "--dropout", "0")
    encoder, decoder, args = ns["encoder"].double(), ns["decoder"].double(), ns["args"]
    g = torch.Generator().manual_seed(1)
    for p in [*encoder.parameters(), *decoder.parameters()]:
        torch.nn.init.uniform_(p, -0.5, 0.5, generator=g)
    args.clip = 0
    x = batch_of(ns)
    torch.manual_seed(3)                                             # the script's draws, in its order
    mean0, logvar0 = encoder(x)
    mean, logvar = ns["svi_steps"](x, mean0.detach(), logvar0.detach(), 0.6)
    z = common.reparameterize(mean, logvar)
    loss = (-decoder.log_prob(x, z)[:, 0] + 0.6 * ns["prior"].kl(mean, logvar)).mean()
    if variant == "vae+svi":                                         # the ordinary ELBO at lambda_0
        z0 = common.reparameterize(mean0, logvar0)
        encoder_loss = (-decoder.log_prob(x, z0)[:, 0] + 0.6 * ns["prior"].kl(mean0, logvar0)).mean()
    else:                                                            # KL(q(lambda_0) || q(lambda_K))
        q0, qk = D.Normal(mean0, (0.5 * logvar0).exp()), D.Normal(mean, (0.5 * logvar).exp())
        encoder_loss = D.kl_divergence(q0, qk).sum(-1).mean()
    expected = [*torch.autograd.grad(encoder_loss, list(encoder.parameters())),
                *torch.autograd.grad(loss, list(decoder.parameters()))]
    torch.manual_seed(3)
    ns["train_step"](x, 0.6)
    got = grads([encoder, decoder])
    assert rel_error(got, expected) < 1e-10


@pytest.mark.parametrize("hvp,tolerance", [("exact", 1e-9), ("central", 1e-8)])
def test_svi_is_per_example(monkeypatch, tmp_path, text_dir, hvp, tolerance):
    """Each sentence refined in a batch ends where it ends alone, and gets the same dL/dlambda_0 (times B),
    with identical noise: eval-mode decoder (no dropout) and the same eps for every sentence."""
    ns = load_script("savae.py", monkeypatch, tmp_path, text_dir, "--hvp", hvp, "--svi_steps", "6",
                     "--svi_lr", "0.4", "--svi_clip", "1.0")
    script = ns["svi_steps"].__globals__                            # the globals savae.py's functions read
    torch.manual_seed(0)
    decoder = common.LSTMDecoder(9, 5, 6, 3).double().eval()
    for p in decoder.parameters():
        torch.nn.init.uniform_(p, -0.6, 0.6)
    monkeypatch.setitem(script, "decoder", decoder)
    eps = torch.tensor([0.3, -1.1, 0.8], dtype=torch.float64)
    monkeypatch.setattr(common, "reparameterize",
                        lambda mean, logvar, n=1, generator=None: (mean + (0.5 * logvar).exp() * eps).unsqueeze(1))
    x = torch.randint(3, 9, (5, 7))
    mean0, logvar0 = torch.randn(5, 3, dtype=torch.float64), 0.3 * torch.randn(5, 3, dtype=torch.float64)
    lam_bar = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)

    def refine(rows):
        trace = []
        mean, logvar = script["svi_steps"](x[rows], mean0[rows], logvar0[rows], 0.8, trace)
        batch = len(mean)                     # the backward loop takes gradients of the batch MEAN loss
        back = script["svi_backward"](x[rows], 0.8, trace, [lam_bar[0][rows] / batch, lam_bar[1][rows] / batch])
        clipped = [(g.norm(dim=-1) > 1.0) for g in trace[0][1]]
        return mean, logvar, back[0] * batch, back[1] * batch, clipped

    together = refine(slice(None))
    assert any(c.any() and not c.all() for c in together[4])        # clipping acts on some sentences only
    for i in range(5):
        alone = refine(slice(i, i + 1))
        for a, b in zip(together[:4], alone[:4]):
            torch.testing.assert_close(a[i:i + 1], b, rtol=tolerance, atol=tolerance * 1e-3)


def test_smoke_runs_through_the_command_line(tmp_path, text_dir):
    text = ["--dataset", "text", "--data_dir", text_dir, *TINY_TEXT]
    runs = {"svi-text": ["svi.py", *text], "savae-text": ["savae.py", *text, "--hvp", "exact"],
            "savae-central": ["savae.py", *text]}
    procs = {name: start_script(script, *args, *TINY, "--svi_steps", "2", "--save_dir", tmp_path / name)
             for name, (script, *args) in runs.items()}           # side by side
    for name, proc in procs.items():
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"{name} failed:\n{output[-3000:]}"
        m = read_metrics(tmp_path / name)
        assert m["method"] == name.split("-")[0] and m["dataset"] == "text" and m["num_examples"] == 10
        assert m["nll"] <= m["neg_elbo"] + 0.05 and m["ppl"] > 1


def test_metrics_come_from_the_scripts_own_inference(monkeypatch, tmp_path, text_dir):
    def metrics(script, *argv):                # the test evaluation of the untrained model (--epochs 0)
        folder = tmp_path / f"{script}{len(argv)}{argv[-1] if argv else ''}"   # a new folder per run: never reused
        load_script(script, monkeypatch, tmp_path, text_dir, *argv, "--save_dir", folder)
        return {k: v for k, v in read_metrics(folder).items() if k not in ("method", "train_seconds")}
    vae = metrics("vae.py")
    assert metrics("savae.py", "--svi_steps", "0") == vae
    assert metrics("savae.py", "--svi_steps", "3", "--svi_lr", "0.5")["kl"] != pytest.approx(vae["kl"], rel=1e-3)
    assert metrics("svi.py", "--svi_steps", "0")["kl"] == 0                       # q = p(z), SVI's start
    assert metrics("svi.py", "--svi_steps", "3", "--svi_lr", "0.5")["kl"] > 0
