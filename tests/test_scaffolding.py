"""docs/design.md: the six method scripts share their scaffolding word for word (the argument header, the setup
and the epoch loop), so that `diff vae.py X.py` shows only what method X changes. Each script may depart from
vae.py's scaffolding only in the lines listed here; a change to the scaffolding of one script (or a method line
that grew into the loop) fails until it is made in all of them or listed, on purpose, below. Also: every script
through its command line on images, the benchmark at a tiny size, and a copied script with its own model."""
import difflib
import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, read_metrics, run_scripts, succeeded

SCRIPTS = ["svi.py", "savae.py", "lagging.py", "iwae.py", "vimco.py"]
# (vae.py's lines the script replaces or drops, how many lines the script adds there)
ALLOWED = {
    "svi.py": ({'encoder, decoder, prior = common.build_model(args, dataset)',
                'modules = {"encoder": encoder, "decoder": decoder, "prior": prior}',
                'optimizer = common.make_optimizer([*encoder.parameters(), *decoder.parameters()], args)',
                'encoder.train(), decoder.train()', 'encoder.eval(), decoder.eval()'}, 5),
    "savae.py": (set(), 0),
    "lagging.py": ({'optimizer = common.make_optimizer([*encoder.parameters(), *decoder.parameters()], args)',
                    'optimizers = {"optimizer": optimizer}', 'rec, kl = train_step(x, kl_weight)',
                    'common.end_epoch(args, state, meter, val, dataset=dataset, modules=modules, optimizers=optimizers)'},
                   19),
    "iwae.py": ({'rec, kl = train_step(x, kl_weight)', 'meter.add(kl_weight, neg_elbo=rec + kl, rec=rec, kl=kl)'}, 2),
    # its own model: binary units (an encoder of logits, a Bernoulli prior), the decoder of build_model
    "vimco.py": ({'encoder, decoder, prior = common.build_model(args, dataset)',
                  'optimizer = common.make_optimizer([*encoder.parameters(), *decoder.parameters()], args)',
                  'rec, kl = train_step(x, kl_weight)', 'meter.add(kl_weight, neg_elbo=rec + kl, rec=rec, kl=kl)'}, 7),
}


def scaffolding(script):
    """The header (the parser up to add_shared_args), the setup (data to the first function) and the loop
    (common.start to the end), as stripped lines without comments."""
    src = (Path(ROOT) / script).read_text()
    parts = [src[src.index("parser = argparse"):src.index("common.add_shared_args(parser)\n") + 31],
             src[src.index("dataset = data.load(args)"):src.index("\ndef ")],
             src[src.index("state = common.start("):]]
    lines = []
    for part in parts:
        for line in part.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


@pytest.mark.parametrize("script", SCRIPTS)
def test_scaffolding_differs_from_vae_only_in_listed_lines(script):
    vae, other = scaffolding("vae.py"), scaffolding(script)
    removed, added = set(), []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=vae, b=other, autojunk=False).get_opcodes():
        if tag != "equal":
            removed.update(vae[i1:i2])
            added += other[j1:j2]
    allowed_removed, allowed_added = ALLOWED[script]
    assert removed <= allowed_removed, f"{script} changes vae.py's scaffolding lines {removed - allowed_removed}"
    assert len(added) == allowed_added, f"{script} adds {len(added)} scaffolding lines, expected {allowed_added}: {added}"


@pytest.mark.parametrize("script", ["vae.py", *SCRIPTS])
def test_every_script_takes_its_name_from_its_file_and_ends_with_the_test_and_reports(script):
    src = (Path(ROOT) / script).read_text()
    assert "args = common.parse_args(parser, __file__)" in src
    assert src.rstrip().endswith("common.final_test(args, state, infer, dataset, modules)\n"
                                 "analysis.report(args, infer, dataset, modules)")


def function_lines(script, name):
    src = (Path(ROOT) / script).read_text()
    body = src[src.index(f"def {name}("):]
    return body[:body.index("\n\n\n")].splitlines()


def test_savae_svi_steps_are_svi_steps_plus_the_recording():
    """diff svi.py savae.py shows only SA-VAE's additions in their shared SVI steps: savae.py's svi_steps is
    svi.py's, line for line, with a trace argument, one more docstring sentence and the lines that record."""
    svi, savae = function_lines("svi.py", "svi_steps"), function_lines("savae.py", "svi_steps")
    changed = [(tag, svi[i1:i2], savae[j1:j2]) for tag, i1, i2, j1, j2 in
               difflib.SequenceMatcher(a=svi, b=savae, autojunk=False).get_opcodes() if tag != "equal"]
    removed = [line for _, old, _ in changed for line in old]
    assert removed == [svi[0], '    Returns (mean_K, logvar_K), detached."""'], changed    # the def line, the docstring's end
    added = [line.strip() for _, _, new in changed for line in new]
    assert sum("trace" in line or "rng" in line for line in added) >= 4 and len(added) <= 8, added


# Every script on images (the PixelCNN's and the MLPs' paths), and the benchmark at a tiny size.

TINY_IMAGES = ["--dataset", "synthetic_images", "--train_size", "40", "--batch_size", "20", "--epochs", "1",
               "--hidden_dim", "4", "--latent_dim", "2", "--iw_samples", "3", "--val_iw_samples", "2",
               "--examples", "0"]       # PixelCNN sampling takes 784 passes: tested in test_analysis.py
IMAGE_RUNS = [("vae.py", []), ("vae.py", ["--image_net", "mlp"]), ("svi.py", ["--svi_steps", "2"]),
              ("savae.py", ["--svi_steps", "2"]), ("lagging.py", ["--inner_steps", "10"]), ("iwae.py", ["--k", "2"])]


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory):
    """The runs of test_every_script_runs_on_images, two at a time (lagging.py, the longest, first):
    {(script, *extra): (CompletedProcess, save_dir)}."""
    root = tmp_path_factory.mktemp("images")
    folders = {(script, *extra): root / f"run{i}" for i, (script, extra) in enumerate(IMAGE_RUNS)}
    present = sorted((run for run in folders if os.path.exists(os.path.join(ROOT, run[0]))),
                     key=lambda run: run[0] != "lagging.py")
    procs = run_scripts({run: [(run[0], *TINY_IMAGES, *run[1:], "--save_dir", folders[run])] for run in present})
    return {run: (procs[run], folders[run]) for run in procs}


@pytest.mark.parametrize("script,extra", IMAGE_RUNS)
def test_every_script_runs_on_images(image_runs, script, extra):
    if not os.path.exists(os.path.join(ROOT, script)):
        pytest.fail(f"{script} is missing")
    proc, save_dir = image_runs[(script, *extra)]
    succeeded({script: proc})
    metrics = read_metrics(save_dir)
    assert metrics["dataset"] == "synthetic_images" and metrics["ppl"] is None
    assert metrics["num_examples"] == 100 and metrics["nll"] > 0


def test_bench_runs_every_method_at_a_tiny_size(tmp_path, monkeypatch):
    """bench/bench.py measures every method's training step and both kinds of evaluation through the scripts' own
    code, so that the benchmark cannot go stale unnoticed."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/bench.py", "--size", "tiny", "--budget", "0.05", "--iw_samples", "3",
                           "--svi_steps", "2", "--inner_steps", "2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    measured = {(r["method"], r["what"].split(" ")[0].rstrip(",")) for r in rows}
    assert measured == {("vae", "training"), ("svi", "training"), ("savae", "training"), ("lagging", "training"),
                        ("iwae", "training"), ("vae", "test"), ("svi", "test")}
    assert all(r["examples_per_s"] > 0 and r["calls"] >= 1 and r["seconds"] > 0 for r in rows)
    assert proc.stdout.count("| tiny |") == len(rows)                  # the printed table has every row
    # bad flags: one line before any measurement (--json in a missing folder measured everything, then crashed)
    for flags, fragment in ((["--iw_samples", "0"], "--iw_samples >= 1"), (["--root", "/nonexistent"], "not a checkout"),
                            (["--json", str(tmp_path / "none" / "b.json")], "its folder must exist"),
                            (["--json", str(out)], "the file must not")):
        monkeypatch.setattr(sys, "argv", ["bench.py", *flags])
        with pytest.raises(SystemExit, match=fragment):
            runpy.run_path(os.path.join(ROOT, "bench", "bench.py"), run_name="__main__")


# Copying a script is one of the three uses: a copy that changes the model keeps every metric right.

MIXTURE_AND_GRU = '''
class MixturePrior(torch.nn.Module):
    """p(z) = (N(z; 2.2, 1) + N(z; 3.8, 1)) / 2 in each dimension: far from N(0, 1), and log-concave (the means
    are less than 2 sd apart), so that with a decoder log-concave in z the posterior is unimodal and a Gaussian q
    with importance sampling reaches log p(x)."""

    def __init__(self, latent_dim):
        super().__init__()
        self.latent_dim = latent_dim

    def log_prob(self, z):
        parts = torch.stack([-0.5 * (common.LOG_2PI + (z - c) ** 2) for c in (2.2, 3.8)])
        return (torch.logsumexp(parts, 0) - math.log(2)).sum(-1)

    def sample(self, n, generator):
        centre = torch.randint(2, (n, self.latent_dim), generator=generator, device=generator.device) * 1.6 + 2.2
        return centre + torch.randn(n, self.latent_dim, generator=generator, device=generator.device)

    def kl(self, mean, logvar):                   # no closed form: one sample of log q(z|x) - log p(z)
        z, log_q = common.sample_q(mean, logvar)
        return log_q[:, 0] - self.log_prob(z[:, 0])


class GRUDecoder(torch.nn.Module):
    """p(x|z) with a GRU over the words whose logits get U z: log p(x|z) is concave in z. U is drawn large, so
    that z matters. Written to the documented interface only."""

    def __init__(self, vocab_size, emb_dim, hidden_dim, latent_dim):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, emb_dim)
        self.gru = torch.nn.GRU(emb_dim, hidden_dim, batch_first=True)
        self.out = torch.nn.Linear(hidden_dim, vocab_size)
        self.z_out = torch.nn.Linear(latent_dim, vocab_size, bias=False)
        torch.nn.init.uniform_(self.z_out.weight, -2, 2)

    def logits(self, inputs, z, state=None):
        h, state = self.gru(self.embed(inputs), state)
        return self.out(h) + self.z_out(z).unsqueeze(1), state

    def log_prob(self, x, z, generator=None):
        batch, n = z.shape[:2]
        x = x.unsqueeze(1).expand(-1, n, -1).reshape(batch * n, -1)
        logits, _ = self.logits(x[:, :-1], z.reshape(batch * n, -1))
        return -torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").sum(-1).view(batch, n)

    def cost_per_sample(self, x):
        return x.shape[1] * (self.out.out_features + self.gru.hidden_size)

    @torch.no_grad()
    def sample(self, z, first, length, greedy=False, generator=None):
        tokens, state, inputs = [], None, first.unsqueeze(1)
        for _ in range(length):
            logits, state = self.logits(inputs, z, state)
            p = logits[:, -1].softmax(-1)
            inputs = p.argmax(-1, keepdim=True) if greedy else torch.multinomial(p, 1, generator=generator)
            tokens.append(inputs)
        return torch.cat(tokens, 1)


'''


def test_a_copied_script_with_its_own_prior_and_decoder_reports_right_metrics(tmp_path, text_dir):
    """vae.py copied to my_vae.py, and only the copy changed: a mixture prior and a GRU decoder that subclasses
    nothing of ours. It trains under its own name, writes its reports, and its test NLL (IW, 5,000 samples from
    its q) agrees with log p(x) by quadrature over z (d = 1) under ITS prior, which is far from the N(0, 1)
    answer: every scoring line used the model's own prior."""
    source = (Path(ROOT) / "vae.py").read_text()
    build = "encoder, decoder, prior = common.build_model(args, dataset)\n"
    copy = source.replace("import argparse\n", "import argparse\nimport math\n\nimport torch\n").replace(
        "parser = argparse.ArgumentParser(", MIXTURE_AND_GRU + "parser = argparse.ArgumentParser(").replace(
        build, build + "decoder = GRUDecoder(dataset.vocab_size, args.emb_dim, args.hidden_dim, args.latent_dim)\n"
                       "prior = MixturePrior(args.latent_dim)\n")
    assert copy.count("GRUDecoder(") == 2 and copy.count("MixturePrior(") == 2
    (tmp_path / "my_vae.py").write_text(copy)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "my_vae.py", "--dataset", "text", "--data_dir", str(text_dir), "--epochs", "8",
                           "--emb_dim", "8", "--hidden_dim", "8", "--latent_dim", "1", "--batch_size", "4",
                           "--iw_samples", "5000", "--kl_start", "1", "--examples", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "runs" / "my_vae-text"                     # the method's name is the copy's file name
    metrics = read_metrics(run)
    assert metrics["method"] == "my_vae" and (run / "examples.txt").exists() and (run / "saliency.json").exists()

    sys.path.insert(0, ROOT)
    import analysis
    import torch
    loaded = analysis.load_run(str(run), str(tmp_path / "my_vae.py"))   # the copy's own classes, best weights
    decoder = loaded["decoder"]
    assert type(decoder).__name__ == "GRUDecoder" and type(loaded["prior"]).__name__ == "MixturePrior"
    z = torch.arange(-15, 15, 0.002).view(1, -1, 1)
    mixture = torch.logsumexp(torch.stack([-0.5 * (math.log(2 * math.pi) + (z - c) ** 2) for c in (2.2, 3.8)]), 0) \
        - math.log(2)
    standard = -0.5 * (math.log(2 * math.pi) + z ** 2)
    log_px = {name: [] for name in ("mixture", "standard")}
    with torch.no_grad():
        for x in loaded["dataset"].batches("test", 4):
            log_lik = decoder.log_prob(x, z.expand(len(x), -1, -1))
            for name, log_pz in (("mixture", mixture), ("standard", standard)):
                log_px[name].append(torch.logsumexp(log_lik + log_pz[..., 0], 1) + math.log(0.002))
    mixture_nll, standard_nll = (-torch.cat(log_px[name]).mean().item() for name in ("mixture", "standard"))
    print("copied script: test nll", metrics["nll"], "quadrature, its prior", mixture_nll, "N(0, 1)", standard_nll)
    assert abs(metrics["nll"] - mixture_nll) < 0.05, (metrics["nll"], mixture_nll, standard_nll)
    assert abs(standard_nll - mixture_nll) > 0.1, (mixture_nll, standard_nll)   # twice the tolerance: it has power
