"""analysis.py: log p(x) on a grid and the gaps against closed forms and importance sampling, He et al.'s posterior
frames, the seed table and curves, examples and saliency (against token-by-token autograd), the PixelCNN sampler,
and `python analysis.py RUN`, which makes a finished run's reports again from its folder."""
import json
import math
import os
import struct
import subprocess
import sys
import time
import types

import pytest
import torch

import analysis
import common
import data
from conftest import ROOT, TINY, TINY_TEXT, run_script
from test_common import LinearGaussian, linear_gaussian_data, mean_field_infer

ORACLE_ARGS = types.SimpleNamespace(dataset="synthetic_oracle", train_size=0, seed=0, device="cpu")


def test_grid_log_px_is_exact_on_linear_gaussian_models():
    for d in (1, 2):
        model = LinearGaussian(d=d, seed=d)
        x = linear_gaussian_data(model, n=40)
        log_px, coarse = analysis.grid_log_px(model, common.StandardNormal(d), x, d)
        torch.testing.assert_close(log_px, model.exact_log_px(x), atol=1e-3, rtol=0)
        assert (log_px - coarse).abs().max() < 0.05     # the posterior (sd ~0.3) is wide enough for both spacings


def test_grid_log_px_matches_a_5000_sample_importance_estimate_on_the_oracle_lstm():
    dataset = data.load(ORACLE_ARGS)
    decoder, x = dataset.true_decoder, dataset.by_length["test"][6][:8]
    torch.manual_seed(0)
    grid, _ = analysis.grid_log_px(decoder, common.StandardNormal(2), x, 2)
    # importance sampling from a proposal that knows nothing of the grid: N(0, 1.5^2 I), 5000 samples
    proposal_mean, proposal_logvar = torch.zeros(len(x), 2), torch.full((len(x), 2), math.log(1.5 ** 2))
    z = common.reparameterize(proposal_mean, proposal_logvar, 5000)
    with torch.no_grad():
        log_w = (analysis.log_prob_chunked(decoder, x, z) + common.StandardNormal(2).log_prob(z)
                 - common.log_normal(z, proposal_mean.unsqueeze(1), proposal_logvar.unsqueeze(1)))
    iw = torch.logsumexp(log_w, 1) - math.log(5000)
    w = (log_w - log_w.max(1, keepdim=True).values).exp()
    se = w.std(1) / (w.mean(1) * math.sqrt(5000))                 # delta method: sd of log of the mean weight
    assert ((grid - iw).abs() < 4 * se + 0.01).all(), (grid, iw, se)
    assert se.max() < 0.2                                          # the comparison has power
    assert grid.mean() < -10                                       # five words out of 1000: a real likelihood


def test_amortization_gap_is_zero_at_the_optimum_and_both_gaps_match_closed_forms():
    torch.manual_seed(1)
    model = LinearGaussian()
    model.W[:, 1] = model.W[:, 0] + 0.5 * model.W[:, 1]          # correlated posterior: mean-field cannot fit it
    x = linear_gaussian_data(model, n=60)
    precision = torch.linalg.inv(model.posterior(x)[1])
    # the mean-field optimum has KL(q || p(z|x)) = (sum log diag(precision) - log det(precision)) / 2
    approximation = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)).item()
    best = analysis.gaps(mean_field_infer(model), model, common.StandardNormal(2), x.split(30), 60, samples=500, seed=0)
    assert abs(best["amortization_gap"]) < 0.01, best
    assert abs(best["approximation_gap"] - approximation) < 0.02, (best, approximation)
    assert approximation > 0.05                                    # W^T W is not diagonal: a real gap

    # a mean off by delta loses exactly delta^T precision delta / 2 of ELBO
    shift = 0.4
    delta = torch.full((2,), shift)
    expected = 0.5 * (delta @ precision @ delta).item()
    worse = analysis.gaps(mean_field_infer(model, shift=shift), model, common.StandardNormal(2), x.split(30), 60,
                           samples=500, seed=0)
    assert abs(worse["amortization_gap"] - expected) < 0.05 * expected, (worse, expected)
    assert abs(worse["approximation_gap"] - approximation) < 0.02
    assert abs(worse["elbo_opt"] - best["elbo_opt"]) < 0.01 and worse["log_px"] == best["log_px"]


def test_gaps_of_a_poor_q_on_the_oracle_lstm_are_non_negative():
    dataset = data.load(ORACLE_ARGS)
    decoder, x = dataset.true_decoder, dataset.by_length["test"][6][:8]
    torch.manual_seed(2)

    def prior(x):                                                   # q = p(z): far from every posterior
        return torch.zeros(len(x), 2), torch.zeros(len(x), 2)
    result = analysis.gaps(prior, decoder, common.StandardNormal(2), [x], 8, samples=200, seed=0)
    assert result["amortization_gap"] > 5 * result["amortization_gap_se"] and result["amortization_gap"] > 1
    assert result["approximation_gap"] > -3 * result["approximation_gap_se"] - 0.01, result
    assert result["log_px_by"] == "grid" and result["examples"] == 8
    assert abs(result["still_falling"]) < 0.05, result       # the budget was enough to converge


class QuadraticDecoder:
    """log p(x|z) = -(z - a_x)^2 / (2 s^2) for a scalar z: with the N(0, 1) prior the true posterior
    mean is a_x / (1 + s^2)."""
    s = 0.5

    def log_prob(self, x, z, generator=None):
        return -(z[..., 0] - x[:, :1]).pow(2) / (2 * self.s ** 2)

    def cost_per_sample(self, x):
        return 1


def test_true_posterior_mean_matches_closed_form():
    a = torch.tensor([[-3.0], [-0.7], [0.0], [1.3], [4.0]])
    grid = torch.arange(-200, 201) / 10                       # as --plot_posterior: [-20, 20], step 0.1
    mean = analysis.true_posterior_mean(QuadraticDecoder(), common.StandardNormal(1), a, grid)
    torch.testing.assert_close(mean, a[:, 0] / (1 + QuadraticDecoder.s ** 2), rtol=0, atol=1e-4)


def test_plot_posterior_writes_frames_and_data(tmp_path, text_dir):
    """--plot_posterior N: frames at step 0, every N steps and at the end, each as PNG and JSON."""
    pytest.importorskip("matplotlib")
    sizes = ["--emb_dim", "8", "--hidden_dim", "8", "--latent_dim", "1", "--batch_size", "4"]
    # without the flag, no frame is drawn, and matplotlib is imported only for the curves after the final test
    # (checked below; run alongside)
    code = ("import sys, runpy, analysis; drawn = []; analysis.draw_curves = lambda *a, **k: drawn.append(1); "
            "sys.argv = ['vae.py', '--dataset', 'text', '--data_dir', r'%s', '--epochs', '1', "
            "'--iw_samples', '1', '--val_iw_samples', '1', '--emb_dim', '8', '--hidden_dim', '8', "
            "'--save_dir', r'%s']; runpy.run_path('vae.py'); assert drawn and 'matplotlib' not in sys.modules"
            % (text_dir, tmp_path / "plain"))
    plain = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_script("vae.py", "--dataset", "text", "--data_dir", text_dir, "--epochs", "1", "--iw_samples", "2",
               "--val_iw_samples", "2", *sizes, "--plot_posterior", "5", "--save_dir", tmp_path)
    files = sorted(p.name for p in (tmp_path / "posterior").iterdir())
    stems = sorted({name.rsplit(".", 1)[0] for name in files})
    assert files == sorted(f"{s}.{ext}" for s in stems for ext in ("json", "png"))
    steps = [int(s) for s in stems[:-1]]
    assert stems[0] == "0000000" and stems[-1] == "final" and len(stems) >= 3   # "final": the tested weights
    assert all(step % 5 == 0 for step in steps)
    points = json.loads((tmp_path / "posterior" / f"{stems[1]}.json").read_text())
    assert points["method"] == "vae" and points["step"] == steps[1] and not points["final"]
    assert len(points["true_mean"]) == len(points["q_mean"]) == 10       # the whole validation split
    assert all(abs(v) < 20 for v in points["true_mean"])
    output = plain.communicate(timeout=600)[0]
    assert plain.returncode == 0, output
    assert not (tmp_path / "plain" / "posterior").exists()


def write_run(folder, method, nll, kl, epochs=3):
    folder.mkdir(parents=True)
    metrics = {"method": method, "dataset": "synthetic", "nll": nll, "neg_elbo": nll + 1, "rec": nll + 1 - kl,
               "kl": kl, "mi": kl / 2, "au": 1, "ppl": math.exp(nll / 10), "iw_samples": 10, "num_examples": 5,
               "train_seconds": 1.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    lines = [{"epoch": e, "lr": 1.0 / e, "kl_weight": 1.0, "seconds": 1.0,
              "train": {"neg_elbo": 50.0 - e, "rec": 49.0 - e, "kl": 1.0},
              "val": {"nll": 48.0 - e, "neg_elbo": 49.0 - e, "rec": 48.0, "kl": 1.0, "mi": 0.5, "au": 1, "ppl": 9.0}}
             for e in range(1, epochs + 1)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 4, "lr"')  # cut off


def test_seed_table_means_and_standard_deviations(tmp_path):
    for seed, (nll, kl) in enumerate([(40.0, 1.0), (42.0, 2.0), (44.0, 6.0)], 1):
        write_run(tmp_path / f"lagging-seed{seed}", "lagging", nll, kl)
    write_run(tmp_path / "vae_seed1", "vae", 45.0, 0.0)
    table = analysis.seed_table(sorted(str(p) for p in tmp_path.iterdir())).splitlines()
    assert table[0].startswith("| run | method | dataset | runs | nll | neg_elbo")
    lagging = next(line for line in table if line.startswith("| lagging |"))
    assert "| 3 | 42.00 +- 2.00 | 43.00 +- 2.00 |" in lagging           # sd over runs with n - 1: 2.00
    assert "| 3.00 +- 2.65 |" in lagging                                # kl 1, 2, 6: sd sqrt(7) = 2.65
    assert next(line for line in table if line.startswith("| vae |")).startswith("| vae | vae | synthetic | 1 | 45.00 |")


def test_curves_png_and_clear_errors(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", "vae", 40.0, 1.0)
    write_run(tmp_path / "b", "lagging", 41.0, 2.0, epochs=2)
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "analysis.py", "--curves", str(tmp_path / "a"), str(tmp_path / "b"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10000
    assert len(analysis.read_log(tmp_path / "a")) == 3                   # the cut-off line is skipped
    for args in (["--curves", str(tmp_path / "none")], ["--table", str(tmp_path / "none")]):
        proc = subprocess.run([sys.executable, "analysis.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


def test_text_runs_leave_reports_that_analysis_makes_again(tmp_path, text_dir):
    """A text run writes examples.txt (prior samples, reconstructions, interpolation), saliency and curves.png;
    --eval_only writes none over them; `python analysis.py RUN` makes them again from the run's folder, the same
    bytes (a crash after metrics.json loses nothing), and --gaps N writes gaps.json, then gaps_2.json."""
    run = tmp_path / "run"
    proc = run_script("vae.py", *TINY, *TINY_TEXT, "--dataset", "text", "--data_dir", text_dir, "--save_dir", run)
    text = (run / "examples.txt").read_text()
    sections = [line for line in text.splitlines() if line.startswith("# ") and not line.startswith("# from")
                and not line.startswith("# to")]
    assert len(sections) == 4 and "reconstruction" in sections[2] and "interpolation" in sections[3]
    body = text.split(sections[2])[1].split("\n# ")[0].strip().splitlines()
    assert 2 <= len(body) <= 5 and all("  ->" in line for line in body)  # the most common test length
    test_words = set((text_dir / "test.txt").read_text().split())
    assert all(set(line.split("  ->")[0].split()) <= test_words for line in body)  # the inputs are test sentences
    assert text.split(sections[3])[1].count("\n") >= 8 + 2             # 8 steps after the two "from/to" lines
    assert "wrote" in proc.stdout and (run / "curves.png").exists()
    report = json.loads((run / "saliency.json").read_text())
    row = report["sentences"][0]
    assert len(row["output"]) == len(row["output_tokens"]) == len(row["input_tokens"]) - 1 == len(row["input"]) - 1
    assert (run / "saliency.html").read_text().count("<span") >= len(row["output"]) + len(row["input"])
    reports = {name: (run / name).read_bytes() for name in ("examples.txt", "saliency.json", "saliency.html")}
    run_script("vae.py", "--eval_only", "--checkpoint", run / "model.pt", "--iw_samples", "2")
    assert all((run / name).read_bytes() == content for name, content in reports.items())
    for name in (*reports, "curves.png"):
        (run / name).unlink()
    again = subprocess.run([sys.executable, "analysis.py", str(run)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr
    assert all((run / name).read_bytes() == content for name, content in reports.items())
    assert (run / "curves.png").exists()
    both = [subprocess.Popen([sys.executable, "analysis.py", str(run), "--gaps", "3"], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
            for _ in range(2)]                      # at once: each gets its own file, neither is lost
    for proc in both:
        assert proc.wait(timeout=300) == 0, proc.communicate()[1]
    first, second = (json.loads((run / name).read_text()) for name in ("gaps.json", "gaps_2.json"))
    assert first["examples"] == 3 and first["method"] == "vae" and first["log_px_by"] == "grid"   # d = 2: the grid
    assert first["log_px"] == second["log_px"]                               # the same weights, the same seed


def test_saliency_equals_token_by_token_autograd():
    """saliency() gets every token's gradient from the decoder's log_prob of the sentences' prefixes, in one
    backward pass; here each token's gradient is taken from the decoder's logits, token by token, in float64."""
    torch.manual_seed(0)
    encoder = common.LSTMEncoder(20, 6, 8, 3).double()
    decoder = common.LSTMDecoder(20, 6, 8, 3, dropout=0.0).double().eval()
    for p in [*encoder.parameters(), *decoder.parameters()]:
        torch.nn.init.uniform_(p, -0.5, 0.5)
    x = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(3, 20, (3, 5))], 1)
    output, inputs = analysis.saliency(encoder, encoder, decoder, x)
    for i in range(3):
        mean = encoder(x[i:i + 1])[0].detach()
        for t in range(1, 6):
            z = mean.clone().requires_grad_()
            logits, _ = decoder.logits(x[i:i + 1, :-1], z)
            grad, = torch.autograd.grad(logits.log_softmax(-1)[0, t - 1, x[i, t]], z)
            assert abs(grad.norm() - output[i, t - 1]) < 1e-10
        emb = encoder.embed(x[i:i + 1]).detach().requires_grad_()
        _, (h, _) = encoder.lstm(emb)
        mean = encoder.to_params(h[-1]).chunk(2, -1)[0][0]
        jacobian = torch.stack([torch.autograd.grad(mean[j], emb, retain_graph=True)[0][0] for j in range(3)])
        assert torch.allclose(jacobian.pow(2).sum((0, 2)).sqrt(), inputs[i], atol=1e-10)
    assert (output > 0).all() and (inputs > 0).all()


def test_pixelcnn_sampler_draws_each_pixel_from_its_conditional():
    """decoder.sample draws pixel i with probability sigmoid(logit_i), the logit computed from the pixels before
    it. By the causal masks, the logits of the finished image are those the sampler used: so replaying the
    sampler's uniform draws u_i against them must give back every pixel, x_i = [u_i < p_i]."""
    torch.manual_seed(0)
    decoder = common.PixelCNNDecoder(2, channels=4, kernels=(3, 3)).eval()
    for p in decoder.parameters():
        torch.nn.init.uniform_(p, -1.0, 1.0)
    z = torch.randn(3, 2)
    images = decoder.sample(z, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    u = torch.stack([torch.rand(3, generator=replay) for _ in range(784)], 1)     # the sampler's draws, in order
    p = torch.sigmoid(decoder.logits(images, z)).view(3, 784)
    assert torch.equal(images.view(3, 784), (u < p).float())
    assert 0.05 < images.mean() < 0.95                                          # not a constant image
    mlp = common.MLPDecoder(2)
    assert mlp.sample(z).shape == (3, 1, 28, 28)


def test_image_runs_leave_png_grids(tmp_path):
    """An image run writes samples.png, reconstructions.png and interpolation.png (MLP decoder: fast)."""
    run = tmp_path / "run"
    run_script("vae.py", "--dataset", "synthetic_images", "--image_net", "mlp", "--train_size", "40", "--epochs", "1",
               "--iw_samples", "2", "--val_iw_samples", "2", "--examples", "3", "--save_dir", run)
    sizes = {}
    for name in ("samples", "reconstructions", "interpolation"):
        data = (run / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        sizes[name] = struct.unpack(">II", data[16:24])
    assert sizes["samples"] == (3 * 30 + 2, 32)                          # 3 images, one row (width, height)
    assert sizes["reconstructions"] == (3 * 30 + 2, 2 * 30 + 2)          # test images over reconstructions
    assert sizes["interpolation"] == (5 * 30 + 2, 32)                    # two ends and 3 steps


def test_tables_and_curves_of_malformed_or_mixed_runs_get_one_line(tmp_path, capsys, monkeypatch):
    """--table averaged runs of different methods named alike into one row, and crashed on a metrics.json that was
    [] or lacked "dataset"; --curves crashed on a log line that was 5, and dropped a mistyped folder silently."""
    write_run(tmp_path / "a" / "vae-seed1", "vae", 40.0, 1.0)
    write_run(tmp_path / "b" / "vae-seed2", "lagging", 50.0, 1.0)
    table = analysis.seed_table([str(tmp_path / "a" / "vae-seed1"), str(tmp_path / "b" / "vae-seed2")]).splitlines()
    assert "warning: runs named vae are of different methods or datasets: a row for each" in capsys.readouterr().out
    assert [line.split(" | ")[1:3] for line in table[2:]] == [["vae", "synthetic"], ["lagging", "synthetic"]]
    for content in ("[]", '{"method": "vae", "nll": 1}', '{"method": "vae", "dataset": "x", "nll": "a"}'):
        (tmp_path / "a" / "vae-seed1" / "metrics.json").write_text(content)
        with pytest.raises(SystemExit, match=r"metrics\.json is not the metrics\.json of a run"):
            analysis.seed_table([str(tmp_path / "a" / "vae-seed1")])
    (tmp_path / "a" / "vae-seed1" / "log.jsonl").write_text('5\n{"lr": 1}\n[1]\n{"epoch": 1, "train": 3, "val": {"nll": "x"}}\n')
    assert len(analysis.read_log(tmp_path / "a" / "vae-seed1")) == 1
    assert "3 lines are not epoch records (skipped)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"no log\.jsonl with epochs in .*/nowhere; pass run folders"):
        analysis.draw_curves([str(tmp_path / "b" / "vae-seed2"), str(tmp_path / "nowhere")], str(tmp_path / "c.png"))
    drawn = []
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda fig, path, **k: drawn.append(fig))
    analysis.draw_curves([str(tmp_path / "b" / "vae-seed2")], str(tmp_path / "c.png"))
    fig = drawn[0]
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert "KL weight" not in titles and "KL weight 1" in fig._suptitle.get_text()      # constant: named, not drawn
    colours = [line.get_color() for line in fig.axes[0].get_lines()]
    assert titles[0].startswith("-ELBO") and len(set(colours)) == len(colours) == 3       # -ELBO and NLL apart
    assert fig.axes[0].get_xlim() == (0.5, 3.5)                  # epochs 1 to 3 (one epoch: 0.5 to 1.5, not 0.96 to 1.04)
    cli = dict(gaps=0, examples=0, saliency=False, table=False, curves=True, script=None, runs=[str(tmp_path / "b" / "vae-seed2")])
    for out, fragment in ((str(tmp_path / "none" / "c.png"), "in a folder that exists"), (str(tmp_path / "c.xyz"), ".png, .pdf")):
        with pytest.raises(SystemExit, match=fragment):
            analysis.main(types.SimpleNamespace(**cli, out=out))
    with pytest.raises(SystemExit, match=r"--examples in \[0, 100\]"):
        analysis.main(types.SimpleNamespace(**dict(cli, examples=10 ** 9), out=None))


class SlowDecoder:
    """Draws blank images, 0.05 s each, and ignores z."""

    def sample(self, z, generator=None):
        time.sleep(0.05 * len(z))
        return torch.zeros(len(z), 1, 28, 28)


def test_image_examples_stop_before_they_cost_more_than_training_and_without_a_latent_are_samples(capsys):
    """24 PixelCNN images took 18 minutes after a 6-minute training, printing nothing; a run without a latent wrote
    no samples and said nothing."""
    images = data.synthetic_images(count=40)
    dataset = data.ImageData({"train": images[:20], "valid": images[20:30], "test": images[30:]}, seed=0)

    def infer(d):
        return lambda x: (torch.zeros(len(x), d), torch.zeros(len(x), d))
    grids = analysis.image_examples(infer(2), SlowDecoder(), common.StandardNormal(2), dataset, 0, 4, budget=0.3,
                                    again="python analysis.py R")
    assert grids == {}                           # 12 images (0.6 s) would pass the 0.3 s budget: one drawn, then a stop
    out = capsys.readouterr().out
    assert "drew 1 of 12 images: more would take longer than 0 s" in out and "python analysis.py R --examples 4" in out
    assert set(analysis.image_examples(infer(2), SlowDecoder(), common.StandardNormal(2), dataset, 0, 4, budget=5)) == \
        {"samples", "reconstructions", "interpolation"}
    assert [len(r) for r in analysis.image_examples(infer(0), SlowDecoder(), common.StandardNormal(0), dataset, 0, 4)
            ["samples"]] == [4]
    vocab = data.SPECIALS + ["a", "b"]
    text = data.TextData({split: [[0, 3, 4, 1]] * 3 for split in ("train", "valid", "test")}, vocab, 0)
    lines = analysis.text_examples(infer(0), common.LSTMDecoder(5, 4, 4, 0), common.StandardNormal(0), text, 0, 3)
    assert lines[0] == "# sentences sampled from the model (no latent: nothing to reconstruct or interpolate)"
    assert len(lines) == 4 and not any("p(z)" in line for line in lines)


def test_saliency_chunks_prefixes_to_bound_memory_and_uses_one_scale_a_page(monkeypatch, capsys):
    """Three 1,500-token test lines asked for 13 GB: the prefixes now go in chunks (the same values), sentences
    over 100 words are left out, and one scale serves the page (a collapsed model was full red in every row)."""
    torch.manual_seed(0)
    encoder, decoder = common.LSTMEncoder(20, 6, 8, 3), common.LSTMDecoder(20, 6, 8, 3).eval()
    x = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(3, 20, (3, 12))], 1)
    whole = analysis.saliency(encoder, encoder, decoder, x)
    monkeypatch.setattr(common, "chunk_floats", lambda device: 3 * decoder.cost_per_sample(x))  # about two prefixes
    calls = []
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, grad=torch.autograd.grad, **k: calls.append(1) or grad(*a, **k))
    chunked = analysis.saliency(encoder, encoder, decoder, x)
    assert len(calls) >= 5 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, chunked))
    vocab = data.SPECIALS + [f"w{i}" for i in range(17)]
    long = data.TextData({"train": x.tolist(), "valid": x.tolist(), "test": [[0] + [5] * 150 + [1]] * 3}, vocab, 0)
    assert analysis.saliency_report(encoder, encoder, decoder, long) == (None, None)
    assert "every test sentence is longer than 100 words" in capsys.readouterr().out
    short = data.TextData({"train": x.tolist(), "valid": x.tolist(), "test": x.tolist()}, vocab, 0)
    report, page = analysis.saliency_report(encoder, encoder, decoder, short)
    assert report["scale"]["output"] == max(max(r["output"]) for r in report["sentences"]) > 0
    assert "barely uses z" in page                 # 8-unit networks at their initial weights: gradients below 0.01
    assert f"full red is {report['scale']['output']:.3g} (output)" in capsys.readouterr().out
