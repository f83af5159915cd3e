"""Reports over finished runs: the seed table's means and standard deviations, and the curves PNG, from run
folders written the way the scripts write them (log.jsonl, metrics.json); bad folders get one clear line."""
import json
import math
import subprocess
import sys

import pytest

import common
from conftest import ROOT


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
    table = common.seed_table(sorted(str(p) for p in tmp_path.iterdir())).splitlines()
    assert table[0].startswith("| run | dataset | runs | nll | neg_elbo")
    lagging = next(line for line in table if line.startswith("| lagging |"))
    assert "| 3 | 42.00 +- 2.00 | 43.00 +- 2.00 |" in lagging           # sd over runs with n - 1: 2.00
    assert "| 3.00 +- 2.65 |" in lagging                                # kl 1, 2, 6: sd sqrt(7) = 2.65
    assert next(line for line in table if line.startswith("| vae |")).startswith("| vae | synthetic | 1 | 45.00 |")


def test_curves_png_and_clear_errors(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", "vae", 40.0, 1.0)
    write_run(tmp_path / "b", "lagging", 41.0, 2.0, epochs=2)
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "common.py", "--curves", str(tmp_path / "a"), str(tmp_path / "b"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10000
    assert len(common.read_log(tmp_path / "a")) == 3                   # the cut-off line is skipped
    for args in (["--curves", str(tmp_path / "none")], ["--table", str(tmp_path / "none")]):
        proc = subprocess.run([sys.executable, "common.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


def test_text_runs_leave_examples_and_curves(tmp_path, text_dir):
    """A text run writes examples.txt (prior samples, reconstructions, interpolation) and curves.png; --eval_only
    writes its examples to a new file, never over the training run's."""
    from conftest import TINY, TINY_TEXT, run_script
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
    before = (run / "examples.txt").read_bytes()
    run_script("vae.py", "--eval_only", "--checkpoint", run / "model.pt", "--iw_samples", "2")
    assert (run / "examples_eval_vae.txt").exists() and (run / "examples.txt").read_bytes() == before


def test_saliency_equals_token_by_token_autograd():
    """saliency() gets every token's gradient from one backward pass over repeated sentences; here each token's
    gradient is taken on its own, with a loop, in float64."""
    import torch
    torch.manual_seed(0)
    encoder = common.LSTMEncoder(20, 6, 8, 3).double()
    decoder = common.LSTMDecoder(20, 6, 8, 3, dropout=0.0).double().eval()
    for p in [*encoder.parameters(), *decoder.parameters()]:
        torch.nn.init.uniform_(p, -0.5, 0.5)
    x = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(3, 20, (3, 5))], 1)
    output, inputs = common.saliency(encoder, encoder, decoder, x)
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
    import torch
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


def test_png_grid_is_a_valid_image(tmp_path):
    import struct
    import zlib
    import torch
    rows = [[torch.zeros(28, 28), torch.ones(28, 28)], [torch.full((28, 28), 0.5)]]
    common.write_png(tmp_path / "g.png", rows)
    data = (tmp_path / "g.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (2 * (2 * 30 + 2), 2 * (2 * 30 + 2))              # 2 images wide, 2 rows, 2x scale
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    pixels = zlib.decompress(idat)
    assert len(pixels) == height * (width + 1)                                 # one filter byte per line
    line = pixels[(2 * 10) * (width + 1) + 1:(2 * 10 + 1) * (width + 1)]       # through the first row of images
    assert line[2 * 10] == 255 and line[2 * 40] == 0                           # white (no ink), then black (ink)


def test_image_runs_leave_png_grids(tmp_path):
    """An image run writes samples.png, reconstructions.png and interpolation.png (MLP decoder: fast)."""
    import struct
    from conftest import run_script
    run = tmp_path / "run"
    run_script("vae.py", "--dataset", "synthetic_images", "--image_net", "mlp", "--train_size", "40", "--epochs", "1",
               "--iw_samples", "2", "--val_iw_samples", "2", "--examples", "3", "--save_dir", run)
    sizes = {}
    for name in ("samples", "reconstructions", "interpolation"):
        data = (run / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        sizes[name] = struct.unpack(">II", data[16:24])
    assert sizes["samples"] == (2 * (3 * 30 + 2), 2 * 32)                        # 3 images, one row
    assert sizes["reconstructions"] == (2 * (3 * 30 + 2), 2 * (2 * 30 + 2))      # test images over reconstructions
    assert sizes["interpolation"] == (2 * (5 * 30 + 2), 2 * 32)                  # two ends and 3 steps
