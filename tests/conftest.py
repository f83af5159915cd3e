import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METRIC_KEYS = {"method", "dataset", "nll", "neg_elbo", "rec", "kl", "mi", "au", "ppl", "iw_samples",
               "num_examples", "train_seconds"}
TINY = ["--train_size", "64", "--epochs", "1", "--iw_samples", "4", "--val_iw_samples", "2"]
TINY_TEXT = ["--emb_dim", "8", "--hidden_dim", "8", "--latent_dim", "2", "--batch_size", "4"]


def _command(script, args):
    """The command line of a method script, and how to run it: from the repository root, one thread
    (these runs are tiny, and extra threads only add contention)."""
    return ([sys.executable, os.path.join(ROOT, script), *map(str, args)],
            dict(cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True))


def start_script(script, *args):
    """Start a method script through its command line; returns the Popen (stderr joined to stdout)."""
    argv, how = _command(script, args)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **how)


def run_script(script, *args, check=True):
    """Run a method script through its command line; returns the CompletedProcess."""
    argv, how = _command(script, args)
    proc = subprocess.run(argv, capture_output=True, timeout=600, **how)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics) == METRIC_KEYS
    return metrics


@pytest.fixture
def text_dir(tmp_path):
    """A tiny one-sentence-per-line corpus with train/valid/test files."""
    words = "the a cat dog sat ran on mat log big small red".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 4)) for i in range(80)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, part in (("train", lines[:60]), ("valid", lines[60:70]), ("test", lines[70:])):
        (folder / f"{name}.txt").write_text("\n".join(part) + "\n")
    return folder
