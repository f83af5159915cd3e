"""lagging.py: --aggressive 0 is vae.py exactly, encoder-only steps leave the decoder alone, the logs,
and He et al.'s finding (the VAE collapses, aggressive training does not) in a CI-sized setting."""
import json
import os
import runpy
import sys

import pytest
import torch

from conftest import ROOT, TINY, TINY_TEXT, read_metrics, run_script, run_scripts, succeeded


def without_time(metrics):
    return {k: v for k, v in metrics.items() if k not in ("train_seconds", "method")}


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_aggressive_0_is_vae_exactly(tmp_path, text_dir):
    args = ["--dataset", "text", "--data_dir", text_dir, *TINY_TEXT, "--epochs", "2", "--iw_samples", "4",
            "--val_iw_samples", "2"]
    succeeded(run_scripts({name: [(f"{name}.py", *args, *extra, "--save_dir", tmp_path / name)]        # side by side
                           for name, extra in (("vae", []), ("lagging", ["--aggressive", "0"]))}))
    vae, lagging = read_metrics(tmp_path / "vae"), read_metrics(tmp_path / "lagging")
    assert lagging["method"] == "lagging"
    assert without_time(vae) == without_time(lagging)
    assert [r["aggressive"] for r in read_log(tmp_path / "lagging")] == [False, False]


def load_lagging(monkeypatch, tmp_path, *args):
    """lagging.py's globals after setup (--epochs 0: no training), to call its steps directly."""
    monkeypatch.setattr(sys, "argv", ["lagging.py", *TINY, "--epochs", "0", *map(str, args),
                                      "--save_dir", str(tmp_path)])
    return runpy.run_path(os.path.join(ROOT, "lagging.py"))


def test_one_sided_steps_clip_jointly_and_step_only_their_network(monkeypatch, tmp_path):
    """He et al.'s code: an encoder-only step computes both networks' gradients, clips them together, and
    steps the encoder alone (a large decoder gradient shortens the encoder's step); a decoder-only step
    likewise leaves q alone."""
    with torch.random.fork_rng():
        g = load_lagging(monkeypatch, tmp_path, "--clip", "0.01")   # clipping always active
        encoder, decoder, train_step = g["encoder"], g["decoder"], g["train_step"]
        encoder.train(), decoder.train()
        x = g["dataset"].batches("train", 16)[0]

        # The expected encoder-only step: gradient of -ELBO, clipped jointly with the decoder's.
        before_enc = [p.detach().clone() for p in encoder.parameters()]
        before_dec = [p.detach().clone() for p in decoder.parameters()]
        rng = torch.get_rng_state()
        mean, logvar = encoder(x)
        z = g["common"].reparameterize(mean, logvar)
        loss = (-decoder.log_prob(x, z)[:, 0] + g["prior"].kl(mean, logvar)).mean()
        grads = torch.autograd.grad(loss, [*encoder.parameters(), *decoder.parameters()])
        n = len(before_enc)
        joint = torch.linalg.vector_norm(torch.stack([gr.norm() for gr in grads]))
        alone = torch.linalg.vector_norm(torch.stack([gr.norm() for gr in grads[:n]]))
        assert joint > 2 * alone                    # the decoder's share shortens the step noticeably here
        scale = min(1.0, 0.01 / (joint + 1e-6))
        expected = [p - g["args"].lr * scale * gr for p, gr in zip(before_enc, grads[:n])]
        torch.set_rng_state(rng)                    # the same noise and dropout masks again

        train_step(x, 1.0, update=("encoder",))
        assert all(torch.equal(p, b) for p, b in zip(decoder.parameters(), before_dec))
        for p, e in zip(encoder.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)

        # The whole inner loop, then the decoder-only step.
        steps = g["encoder_steps"](x, 1.0, g["dataset"].batches("train", 16))
        assert 1 <= steps <= 100
        assert all(torch.equal(p, b) for p, b in zip(decoder.parameters(), before_dec))
        before_enc = [p.detach().clone() for p in encoder.parameters()]
        train_step(x, 1.0, update=("decoder",))
        assert all(torch.equal(p, b) for p, b in zip(encoder.parameters(), before_enc))
        assert any(not torch.equal(p, b) for p, b in zip(decoder.parameters(), before_dec))


def test_smoke_logs_mode_and_inner_steps_and_resumes_exactly(tmp_path, text_dir):
    args = ["--dataset", "text", "--data_dir", text_dir, *TINY_TEXT, "--iw_samples", "4", "--val_iw_samples", "2",
            "--inner_steps", "30"]
    resumed = tmp_path / "resumed"          # interrupted after epoch 1 and resumed, beside the straight run
    succeeded(run_scripts({"resumed": [("lagging.py", *args, "--epochs", "1", "--save_dir", resumed),
                                       ("lagging.py", *args, "--epochs", "2", "--resume", "--save_dir", resumed)],
                           "straight": [("lagging.py", *args, "--epochs", "2", "--save_dir", tmp_path / "straight")]}))
    metrics = read_metrics(tmp_path / "straight")
    assert metrics["method"] == "lagging" and metrics["num_examples"] == 10
    log = read_log(tmp_path / "straight")
    assert [r["epoch"] for r in log] == [1, 2]
    for record in log:                               # epoch 1 cannot switch it off: no previous MI
        assert record["aggressive"] is True and 1 <= record["inner_steps"] <= 30
        assert {"mi", "au", "kl"} <= set(record["val"])
    # interrupted after epoch 1 and resumed: the same mode, batches and numbers as the straight run
    assert without_time(read_metrics(tmp_path / "resumed")) == without_time(metrics)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in log]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(tmp_path / "resumed")] == strip


COLLAPSE_ARGS = ["--train_size", "1600", "--epochs", "1", "--iw_samples", "10",
                 "--val_iw_samples", "2"]   # with one epoch, validation does not steer training: kept cheap
COLLAPSE_RUNS = [(name, seed) for name in ("lagging", "vae") for seed in (1, 2, 3)]


def background_runs(folder):
    """The runs of test_vae_collapses_where_aggressive_training_does_not, started with the session at a low
    priority (conftest.py), the longer lagging.py runs first."""
    return {f"{name}-{seed}": [(f"{name}.py", *COLLAPSE_ARGS, "--seed", seed,
                                "--save_dir", folder / f"{name}-{seed}")] for name, seed in COLLAPSE_RUNS}


def test_vae_collapses_where_aggressive_training_does_not(background):
    """He et al.'s finding at CI size: synthetic data, d = 1, 1,600 sentences, one epoch (100 batches),
    He et al.'s stopping rule, the same seed and data for both. vae.py collapses; lagging.py keeps z.
    Floating point differs across machines and collapse dynamics amplify it, so the claim is asserted
    over three seeds with margins rather than as one machine's numbers: every VAE run collapsed, and
    lagging.py with an active unit and MI > 0.3 in at least 2 of the 3 (measured here: MI 1.00 / 1.27 /
    0.67 in seeds 1 / 2 / 3, KL 1.13 / 1.58 / 0.88, AU 1; the VAE's KL <= 0.0003, |MI| < 0.005, AU 0)."""
    procs, folder = background(__name__)                 # COLLAPSE_ARGS, seeds 1, 2, 3 (background_runs)
    succeeded(procs)
    results = {(name, seed): read_metrics(folder / f"{name}-{seed}") for name, seed in COLLAPSE_RUNS}
    for seed in (1, 2, 3):
        vae = results["vae", seed]
        assert vae["au"] == 0 and vae["kl"] < 0.01 and abs(vae["mi"]) < 0.02, (seed, vae)     # collapsed
    kept = [seed for seed in (1, 2, 3) if results["lagging", seed]["au"] == 1 and results["lagging", seed]["mi"] > 0.3]
    assert len(kept) >= 2, {seed: results["lagging", seed] for seed in (1, 2, 3)}
