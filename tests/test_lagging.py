"""lagging.py: --aggressive 0 is vae.py exactly, encoder-only steps leave the decoder alone, the logs,
and He et al.'s finding (the VAE collapses, aggressive training does not) in a CI-sized setting."""
import json
import os
import runpy
import sys

import torch

from conftest import ROOT, TINY, read_metrics, run_script


def without_time(metrics):
    return {k: v for k, v in metrics.items() if k not in ("train_seconds", "method")}


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_aggressive_0_is_vae_exactly(tmp_path):
    args = ["--train_size", "96", "--epochs", "2", "--iw_samples", "4", "--val_iw_samples", "2"]
    run_script("vae.py", *args, "--save_dir", tmp_path / "vae")
    run_script("lagging.py", *args, "--aggressive", "0", "--save_dir", tmp_path / "lagging")
    vae, lagging = read_metrics(tmp_path / "vae"), read_metrics(tmp_path / "lagging")
    assert lagging["method"] == "lagging"
    assert without_time(vae) == without_time(lagging)
    assert [r["aggressive"] for r in read_log(tmp_path / "lagging")] == [False, False]


def load_lagging(monkeypatch, tmp_path, *args):
    """lagging.py's globals after setup (--epochs 0: no training), to call its steps directly."""
    monkeypatch.setattr(sys, "argv", ["lagging.py", *TINY, "--epochs", "0", *map(str, args),
                                      "--save_dir", str(tmp_path)])
    return runpy.run_path(os.path.join(ROOT, "lagging.py"))


def test_one_sided_steps_touch_only_their_network(monkeypatch, tmp_path):
    with torch.random.fork_rng():
        g = load_lagging(monkeypatch, tmp_path, "--clip", "0.01")   # clipping always active
        encoder, decoder, train_step = g["encoder"], g["decoder"], g["train_step"]
        encoder.train(), decoder.train()
        x = g["dataset"].batches("train", 16)[0]

        # The expected encoder-only step: gradient of -ELBO w.r.t. the encoder alone, clipped alone.
        before_enc = [p.detach().clone() for p in encoder.parameters()]
        before_dec = [p.detach().clone() for p in decoder.parameters()]
        rng = torch.get_rng_state()
        mean, logvar = encoder(x)
        z = g["common"].reparameterize(mean, logvar)
        loss = (-decoder.log_prob(x, z)[:, 0] + g["common"].kl_normal(mean, logvar)).mean()
        grads = torch.autograd.grad(loss, list(encoder.parameters()))
        scale = min(1.0, 0.01 / (torch.linalg.vector_norm(torch.stack([gr.norm() for gr in grads])) + 1e-6))
        expected = [p - g["args"].lr * scale * gr for p, gr in zip(before_enc, grads)]
        torch.set_rng_state(rng)                    # the same noise and dropout masks again

        train_step(x, 1.0, update=("encoder",))
        assert all(p.grad is None for p in decoder.parameters())
        assert all(torch.equal(p, b) for p, b in zip(decoder.parameters(), before_dec))
        for p, e in zip(encoder.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)

        # The whole inner loop, then the decoder-only step.
        steps = g["encoder_steps"](x, 1.0)
        assert 1 <= steps <= 100
        assert all(p.grad is None for p in decoder.parameters())
        assert all(torch.equal(p, b) for p, b in zip(decoder.parameters(), before_dec))
        for p in encoder.parameters():
            p.grad = None
        before_enc = [p.detach().clone() for p in encoder.parameters()]
        train_step(x, 1.0, update=("decoder",))
        assert all(p.grad is None for p in encoder.parameters())
        assert all(torch.equal(p, b) for p, b in zip(encoder.parameters(), before_enc))
        assert any(not torch.equal(p, b) for p, b in zip(decoder.parameters(), before_dec))


def test_smoke_logs_mode_and_inner_steps_and_resumes_exactly(tmp_path):
    args = ["--train_size", "64", "--iw_samples", "4", "--val_iw_samples", "2"]
    run_script("lagging.py", *args, "--epochs", "2", "--save_dir", tmp_path / "straight")
    metrics = read_metrics(tmp_path / "straight")
    assert metrics["method"] == "lagging" and metrics["num_examples"] == 2000
    log = read_log(tmp_path / "straight")
    assert [r["epoch"] for r in log] == [1, 2]
    for record in log:                               # epoch 1 cannot switch it off: no previous MI
        assert record["aggressive"] is True and 1 <= record["inner_steps"] <= 100
        assert {"mi", "au", "kl"} <= set(record["val"])
    # interrupted after epoch 1 and resumed: the same mode, batches and numbers as the straight run
    run_script("lagging.py", *args, "--epochs", "1", "--save_dir", tmp_path / "resumed")
    run_script("lagging.py", *args, "--epochs", "2", "--resume", "--save_dir", tmp_path / "resumed")
    assert without_time(read_metrics(tmp_path / "resumed")) == without_time(metrics)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in log]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(tmp_path / "resumed")] == strip
