"""Images: the PixelCNN is autoregressive, Omniglot's .mat layout, binarisation, and every script on
synthetic binary images through its command line."""
import os
import types

import numpy as np
import pytest
import torch

import common
import data
from conftest import ROOT, read_metrics, run_scripts, succeeded

TINY_IMAGES = ["--dataset", "synthetic_images", "--train_size", "40", "--batch_size", "20", "--epochs", "1",
               "--hidden_dim", "4", "--latent_dim", "2", "--iw_samples", "3", "--val_iw_samples", "2",
               "--examples", "0"]       # PixelCNN sampling takes 784 passes: tested in test_reports.py


def test_pixelcnn_term_of_pixel_i_ignores_every_later_pixel():
    torch.manual_seed(0)
    decoder = common.PixelCNNDecoder(latent_dim=2, channels=8).eval()
    x = (torch.rand(1, 1, 28, 28) < 0.5).float()
    z = torch.randn(1, 1, 2)
    # Copy k keeps pixels 0..k (raster order) and redraws every later pixel.
    keep = torch.arange(784).view(1, -1) <= torch.arange(784).view(-1, 1)               # [copy, pixel]
    redrawn = (torch.rand(784, 784) < 0.5).float()
    copies = torch.where(keep, x.view(1, -1), redrawn).view(784, 1, 28, 28)
    with torch.no_grad():
        base = decoder.pixel_log_prob(x, z)[0, 0]                                       # [784]
        terms = torch.cat([decoder.pixel_log_prob(c, z.expand(len(c), -1, -1))[:, 0] for c in copies.split(196)])
    change = (terms - base.view(1, -1)).abs()      # kernels differ with batch size: float noise ~1e-7
    assert change[keep].max() < 1e-5, f"{(change[keep] >= 1e-5).sum()} terms changed when only later pixels changed"
    assert (change.masked_fill(keep, 0) > 1e-4).any(1)[:700].all()   # the model does use the earlier pixels


def test_pixelcnn_has_no_blind_spot_and_uses_z():
    torch.manual_seed(1)
    decoder = common.PixelCNNDecoder(latent_dim=2, channels=8).eval()
    x = (torch.rand(1, 1, 28, 28) < 0.5).float()
    z = torch.randn(1, 1, 2)
    with torch.no_grad():
        base = decoder.pixel_log_prob(x, z)[0, 0].view(28, 28)
        for row, col in [(13, 16), (12, 17), (14, 13), (13, 14)]:      # above-right: a plain PixelCNN's blind spot
            flipped = x.clone()
            flipped[0, 0, row, col] = 1 - flipped[0, 0, row, col]
            assert (decoder.pixel_log_prob(flipped, z)[0, 0].view(28, 28)[14, 14] - base[14, 14]).abs() > 1e-4, (row, col)
        moved = (decoder.pixel_log_prob(x, z + 1)[0, 0] - base.flatten()).abs() > 1e-6
        assert moved[0] and moved.float().mean() > 0.98        # z reaches every pixel, the first included


def test_bernoulli_log_likelihood_from_logits_is_not_clamped():
    logits, x = torch.tensor([100.0, -100.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(common.bernoulli_log_prob(logits, x), torch.tensor([-100.0, 0.0, -np.log(2.0)], dtype=torch.float32))
    mlp = common.MLPDecoder(latent_dim=3, hidden=5)
    images = (torch.rand(4, 1, 28, 28) < 0.5).float()
    assert mlp.log_prob(images, torch.randn(4, 6, 3)).shape == (4, 6)


def test_omniglot_mat_loader_keeps_orientation(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    images = np.zeros((3, 28, 28))
    images[0, 2, 20] = 1.0                        # one bright pixel: row 2, column 20
    images[1, :, 5] = 0.5                         # a vertical bar in column 5
    images[2, 27, :] = 1.0                        # the bottom row
    columns = np.stack([im.flatten(order="F") for im in images], 1)     # MATLAB's column-major layout
    scipy_io.savemat(tmp_path / "chardata.mat", {"data": columns, "testdata": columns[:, :2],
                                                  "target": np.eye(3), "testtarget": np.eye(2)})
    loaded = data.read_omniglot_mat(str(tmp_path / "chardata.mat"))
    assert loaded["train"].shape == (3, 28, 28) and loaded["test"].shape == (2, 28, 28)
    torch.testing.assert_close(loaded["train"], torch.tensor(images, dtype=torch.float32))


def test_omniglot_split_and_binarisation(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    grey = np.random.default_rng(0).random((784, 60))
    scipy_io.savemat(tmp_path / "chardata.mat", {"data": grey, "testdata": grey[:, :10]})
    args = types.SimpleNamespace(data_dir=str(tmp_path), dataset="omniglot", train_size=0, seed=0, device="cpu")
    ds = data.load_omniglot(args, valid_count=15)
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (45, 15, 10)
    assert ds.batches("valid", 100)[0].equal(ds.batches("valid", 100)[0])      # binarised once
    for split in ("train", "valid", "test"):
        assert set(torch.cat(ds.batches(split, 7)).unique().tolist()) <= {0.0, 1.0}
    first, second = (torch.cat(ds.batches("train", 100, shuffle=False)) for _ in range(2))
    assert not first.equal(second)                # training images re-binarised every epoch
    (tmp_path / "chardata.mat").unlink()
    with pytest.raises(SystemExit, match=r"chardata\.mat.*yburda/iwae"):
        data.load_omniglot(args)


IMAGE_RUNS = [("vae.py", []), ("vae.py", ["--image_net", "mlp"]), ("svi.py", ["--svi_steps", "2"]),
              ("savae.py", ["--svi_steps", "2"]), ("lagging.py", []), ("iwae.py", ["--k", "2"])]


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
