"""Reliability: no result, checkpoint or log line lost or overwritten; one run per folder (a lock held while the
run lives, released even when it is killed); resume equal to a straight run, also after a kill that left the log
ahead of the checkpoint and for a run that had already stopped; flags compared on --resume; divergence stops with
one line and can continue from the best weights; bad flags, unwritable folders and text-input quirks get one
line, never a traceback.
The runs are tiny and started in parallel; assertions compare runs on this machine, never fixed numbers."""
import argparse
import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import common
import data
from conftest import METRIC_KEYS, ROOT, _command, read_metrics, run_script, start_script

CORPUS = {}            # the tiny corpus of the module's runs (written by the fixture)


def tiny():
    """A tiny text run: 60/10/10 sentences, 8-unit networks, no gradient clipping (so that a huge --lr diverges)."""
    return ["--dataset", "text", "--data_dir", CORPUS["dir"], "--emb_dim", "8", "--hidden_dim", "8",
            "--latent_dim", "2", "--batch_size", "4", "--iw_samples", "2", "--val_iw_samples", "2", "--clip", "0"]


def finish(procs):
    """Wait for started scripts; {name: (returncode, output)} (stderr is joined to stdout)."""
    return {name: (p.wait(timeout=600), p.communicate()[0]) for name, p in procs.items()}


def one_line_error(returncode, output, *fragments):
    assert returncode != 0 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and output.strip().splitlines()[-1] == errors[0], output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def refused(monkeypatch, script, *argv):
    """Run a script's setup in this process (fast: no new interpreter) and return the one-line error it stops
    with. parse_args refuses bad flags before any data is read."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    with pytest.raises(SystemExit) as stop:
        if script == "lagging.py":
            runpy.run_path(os.path.join(ROOT, script), run_name="__test__")
        else:
            parser = argparse.ArgumentParser()
            common.add_shared_args(parser)
            common.parse_args(parser, script)
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def read_log(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (folder / "log.jsonl").read_text().splitlines()]


def files(folder):
    """Every file of a run folder with its bytes (to show that nothing was changed), but the lock file: it names
    the last process that held the folder."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "lock"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained once, in parallel: 'one' (vae, 1 epoch), 'two' (vae, 2 epochs straight); and 'svi', one's
    checkpoint as svi.py writes it (only a decoder)."""
    root = tmp_path_factory.mktemp("runs")
    words = "the a cat dog sat ran on mat log big small red".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 4)) for i in range(80)]
    CORPUS["dir"] = root / "corpus"
    CORPUS["dir"].mkdir()
    for name, part in (("train", lines[:60]), ("valid", lines[60:70]), ("test", lines[70:])):
        (CORPUS["dir"] / f"{name}.txt").write_text("\n".join(part) + "\n")
    procs = {"one": start_script("vae.py", *tiny(), "--epochs", "1", "--save_dir", root / "one"),
             "two": start_script("vae.py", *tiny(), "--epochs", "2", "--save_dir", root / "two")}
    for name, (code, output) in finish(procs).items():
        assert code == 0, output
    payload = torch.load(root / "one" / "model.pt", weights_only=False)
    payload["args"]["method"] = "svi"
    for which in ("modules", "best_modules"):
        payload[which].pop("encoder", None)          # the two can be one object (epoch 1 was the best)
    (root / "svi").mkdir()
    torch.save(payload, root / "svi" / "model.pt")
    return root


def copy_run(runs, name, tmp_path):
    return shutil.copytree(runs / name, tmp_path / name)


# ------------------------------------------------------------------------------------------------
# Lost or corrupted results.

def test_eval_only_writes_a_new_file_and_other_methods_only_when_asked(runs, tmp_path, monkeypatch):
    one, svi = copy_run(runs, "one", tmp_path), copy_run(runs, "svi", tmp_path)
    before = files(one)
    procs = {"vae": start_script("vae.py", "--eval_only", "--checkpoint", one / "model.pt"),
             "iwae_cross": start_script("iwae.py", "--eval_only", "--checkpoint", one / "model.pt", "--cross_method"),
             "vae_from_svi": start_script("vae.py", "--eval_only", "--checkpoint", svi / "model.pt", "--cross_method")}
    assert "trained by vae.py" in refused(monkeypatch, "savae.py", "--eval_only", "--checkpoint", one / "model.pt")
    assert "--dataset ptb" in refused(monkeypatch, "vae.py", "--eval_only", "--checkpoint", one / "model.pt",
                                      "--dataset", "ptb")
    assert "--latent_dim 3" in refused(monkeypatch, "vae.py", "--eval_only", "--checkpoint", one / "model.pt",
                                       "--latent_dim", "3")
    assert "is a folder" in refused(monkeypatch, "vae.py", "--eval_only", "--checkpoint", one)
    out = finish(procs)
    assert out["vae"][0] == 0 and out["iwae_cross"][0] == 0, out
    one_line_error(*out["vae_from_svi"], "no encoder", "svi.py")
    after = files(one)
    assert {k: v for k, v in after.items() if k in before} == before      # the training run is untouched
    own = json.loads(after["metrics_eval_vae_epoch1.json"])
    cross = json.loads(after["metrics_eval_iwae_from_vae_epoch1.json"])
    assert own["method"] == own["trained_by"] == "vae" and own["checkpoint_epoch"] == 1
    assert cross["method"] == "iwae" and cross["trained_by"] == "vae"
    assert set(own) == METRIC_KEYS | {"checkpoint", "checkpoint_epoch", "trained_by"}
    trained = read_metrics(one)
    assert own["kl"] == pytest.approx(trained["kl"], rel=1e-5)              # the same weights, the same q
    # a second evaluation gets its own file too
    run_script("vae.py", "--eval_only", "--checkpoint", one / "model.pt")
    assert (one / "metrics_eval_vae_epoch1_2.json").exists() and files(one)["metrics_eval_vae_epoch1.json"] == \
        after["metrics_eval_vae_epoch1.json"]


def test_a_new_run_never_lands_in_a_folder_that_holds_a_run(runs, tmp_path, monkeypatch):
    one = copy_run(runs, "one", tmp_path)
    partial = tmp_path / "partial"                      # killed in its first epoch: only a log with a line
    partial.mkdir()
    (partial / "log.jsonl").write_text('{"epoch": 1}\n')
    before = files(one)
    for folder in (one, partial):
        message = refused(monkeypatch, "vae.py", *tiny(), "--save_dir", folder)
        assert "already holds a run" in message and "--resume" in message
    assert files(one) == before and (partial / "log.jsonl").read_text() == '{"epoch": 1}\n'
    proc = run_script("vae.py", *tiny(), "--save_dir", one, check=False)          # and through the command line
    one_line_error(proc.returncode, proc.stdout + proc.stderr, "already holds a run")


def test_resume_after_a_kill_that_left_the_log_ahead_equals_the_straight_run(runs, tmp_path):
    """The kill left: the log ahead of model.pt, a line cut off mid-write, and a partial model.pt.tmp. The log
    lines live in the checkpoint, so resume writes log.jsonl again from it; the next save replaces the temporary
    file; the log and metrics are the straight run's."""
    one = copy_run(runs, "one", tmp_path)
    (one / "metrics.json").unlink()
    with open(one / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 1.0}\n{"epoch": 3, "lr"')
    stale = one / "model.pt.tmp"
    stale.write_bytes(b"partial")
    run_script("vae.py", "--resume", "--epochs", "2", "--save_dir", one)
    assert not stale.exists()
    straight = read_metrics(runs / "two")
    assert {k: v for k, v in read_metrics(one).items() if k != "train_seconds"} == \
        {k: v for k, v in straight.items() if k != "train_seconds"}
    assert read_log(one) == read_log(runs / "two")


def test_two_runs_in_one_folder_the_second_is_refused_and_a_killed_run_can_be_resumed(runs, tmp_path):
    """Started together in one folder, the second run stops at once with one line that names the folder and the
    run holding it (before, both ran and the first run's results were lost). The lock dies with its process:
    after a kill -9, --resume continues the run."""
    folder = tmp_path / "shared"
    # --patience: on a fast machine, 5 lr halvings (patience 2) came before the kill, and the run had ended itself
    first = start_script("vae.py", *tiny(), "--epochs", "100000", "--patience", "100000", "--save_dir", folder)
    deadline = time.time() + 120
    while not (folder / "model.pt").exists() and time.time() < deadline:     # its first checkpoint
        time.sleep(0.05)
    second = run_script("vae.py", *tiny(), "--seed", "7", "--save_dir", folder, check=False)
    one_line_error(second.returncode, second.stdout + second.stderr, str(folder), "is in use by vae.py (process",
                   str(first.pid))
    first.kill()
    first.wait(timeout=60)
    epochs = len(read_log(folder))
    assert epochs >= 1 and first.returncode != 0
    run_script("vae.py", "--resume", "--epochs", str(epochs + 1), "--save_dir", folder)
    assert [r["epoch"] for r in read_log(folder)] == list(range(1, epochs + 2)) and read_metrics(folder)


def test_a_finished_run_is_not_trained_further(runs, tmp_path):
    """Stopped by --epochs or after 5 lr halvings (set in the checkpoint: a run that stops early by itself takes
    too long for a test): --resume trains nothing; killed during the final test, it reruns only the test."""
    done, halved = copy_run(runs, "one", tmp_path), tmp_path / "halved"
    shutil.copytree(done, halved)
    payload = torch.load(halved / "model.pt", weights_only=False)
    payload["state"]["decays"] = common.MAX_DECAYS
    torch.save(payload, halved / "model.pt")
    (halved / "metrics.json").unlink()                   # as if killed during its final test
    before = files(done)
    procs = {"done": start_script("vae.py", "--resume", "--save_dir", done),
             "halved": start_script("vae.py", "--resume", "--epochs", "5", "--save_dir", halved)}
    out = finish(procs)
    assert out["done"][0] == 0 and "nothing to do" in out["done"][1] and files(done) == before
    assert out["halved"][0] == 0 and "running only the final test" in out["halved"][1], out["halved"][1]
    assert "epoch 2" not in out["halved"][1] and read_log(halved) == read_log(done)
    assert read_metrics(halved) == read_metrics(done)    # the same weights and random numbers as its first test


def test_training_on_to_more_epochs_keeps_the_earlier_metrics(runs, tmp_path):
    one = copy_run(runs, "one", tmp_path)
    earlier = (one / "metrics.json").read_bytes()
    run_script("vae.py", "--resume", "--epochs", "2", "--save_dir", one)
    assert (one / "metrics_epoch1.json").read_bytes() == earlier
    assert [r["epoch"] for r in read_log(one)] == [1, 2]


def test_a_failed_checkpoint_write_keeps_the_old_one_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous")

    def disk_full(obj, f):
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file\nmore")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as stop:
        common.save_checkpoint(str(path), {})
    message = str(stop.value)
    assert message.startswith("error: cannot write the checkpoint") and "\n" not in message and "--resume" in message
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.pt"]


def test_perplexity_overflow_is_inf_not_a_crash():
    class Decoder(torch.nn.Module):           # every token costs 1000 nats: exp(1000) overflows a float
        def log_prob(self, x, z, generator=None):
            return torch.full(z.shape[:2], -1000.0 * (x.shape[1] - 1))

        def cost_per_sample(self, x):
            return 1

    x = torch.zeros(3, 5, dtype=torch.long)
    metrics = common.evaluate(lambda x: (torch.zeros(3, 1), torch.zeros(3, 1)), Decoder(), common.StandardNormal(1), [x], 2)
    assert metrics["ppl"] == math.inf and math.isfinite(metrics["nll"])


# ------------------------------------------------------------------------------------------------
# Flags compared on --resume; divergence.

def test_resume_refuses_changed_flags_and_takes_the_saved_ones(runs, tmp_path, monkeypatch):
    one = copy_run(runs, "one", tmp_path)
    before = files(one)
    for flag, value, saved in (("batch_size", "8", "(4)"), ("seed", "1", "783435"), ("lr", "0.5", "--from_best"),
                               ("dropout", "0.1", "0.5"), ("train_size", "32", "(0)"), ("hidden_dim", "9", "(8)")):
        message = refused(monkeypatch, "vae.py", "--resume", "--epochs", "2", f"--{flag}", value, "--save_dir", one)
        assert f"--{flag} {value}" in message and saved in message, message
    assert "vae.py" in refused(monkeypatch, "savae.py", "--resume", "--save_dir", one)
    message = refused(monkeypatch, "vae.py", "--resume", "--save_dir", tmp_path / "nothing")
    assert "found no checkpoint" in message and "--save_dir" in message
    assert files(one) == before
    # flags not given come from the checkpoint (printed in the header), so this continues the same run
    proc = run_script("vae.py", "--resume", "--epochs", "2", "--save_dir", one)
    assert "hidden_dim=8" in proc.stdout and "clip=0.0" in proc.stdout and "dataset=text" in proc.stdout


def test_divergence_stops_saves_nothing_and_continues_from_the_best_weights(runs, tmp_path):
    one = copy_run(runs, "one", tmp_path)
    model = (one / "model.pt").read_bytes()
    proc = run_script("vae.py", "--resume", "--from_best", "--lr", "1e30", "--epochs", "2", "--print_every", "1",
                      "--save_dir", one, check=False)
    one_line_error(proc.returncode, proc.stdout + proc.stderr, "became", "epoch 2", "--resume --from_best --lr")
    assert (one / "model.pt").read_bytes() == model and [r["epoch"] for r in read_log(one)] == [1]
    run_script("vae.py", "--resume", "--from_best", "--lr", "0.5", "--epochs", "2", "--save_dir", one)
    log = read_log(one)
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["lr"] == 0.5
    assert math.isfinite(read_metrics(one)["nll"])
    assert torch.load(one / "model.pt", weights_only=False)["state"]["epoch"] == 2


def test_non_finite_validation_saves_nothing(tmp_path):
    """A validation loss that is NaN (even in epoch 1, where there are no best weights yet) stops the run with one
    line before the schedule, the checkpoint or the log are touched."""
    args = types.SimpleNamespace(save_dir=str(tmp_path), patience=2, warmup=0, batch_size=4)
    meter = types.SimpleNamespace(result=lambda: {"neg_elbo": 1.0, "rec": 1.0, "kl": 0.0}, start=0.0, end=1.0, epoch=1)
    state = {"epoch": 0, "step": 0, "lr": 1.0, "best_val": math.inf, "worse_epochs": 0, "decays": 0, "train_seconds": 0.0,
             "log": []}
    val = {"nll": math.nan, "neg_elbo": math.nan, "kl": 0.0, "mi": 0.0, "au": 0}
    with pytest.raises(SystemExit) as stop:
        common.end_epoch(args, state, meter, val, dataset=None, modules={}, optimizers={})
    assert str(stop.value).startswith("error: validation") and "start again with a lower --lr" in str(stop.value)
    assert os.listdir(tmp_path) == [] and state["epoch"] == 0


# ------------------------------------------------------------------------------------------------
# Bad flags and unwritable folders: one line, before any work.

BAD = {
    "print_every": ("vae.py", ["--print_every", "0"], "--print_every"),
    "lr": ("vae.py", ["--lr", "-1"], "--lr"),
    "dropout": ("vae.py", ["--dropout", "1.5"], "--dropout"),
    "hidden_dim": ("vae.py", ["--hidden_dim", "0"], "--hidden_dim"),
    "emb_dim": ("vae.py", ["--emb_dim", "0"], "--emb_dim"),
    "epochs": ("vae.py", ["--epochs", "-1"], "--epochs"),
    "train_size": ("vae.py", ["--train_size", "-1"], "--train_size"),
    "val_iw_samples": ("vae.py", ["--val_iw_samples", "0"], "--val_iw_samples"),
    "inner_steps": ("lagging.py", ["--inner_steps", "0"], "--inner_steps"),
    "lagging_latent": ("lagging.py", ["--latent_dim", "0"], "--latent_dim"),
    "checkpoint": ("vae.py", ["--checkpoint", "x.pt"], "--eval_only"),
    "from_best": ("vae.py", ["--from_best"], "--resume"),
    "cross_method": ("vae.py", ["--cross_method"], "--eval_only"),
    "proc": ("vae.py", ["--save_dir", "/proc/vi_test/run"], "/proc/vi_test/run"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_flags_and_unwritable_folders_get_one_line(case, tmp_path, monkeypatch):
    script, flags, fragment = BAD[case]
    save_dir = [] if "--save_dir" in flags else ["--save_dir", tmp_path / "run"]
    assert fragment in refused(monkeypatch, script, "--train_size", "64", *flags, *save_dir)


def test_unwritable_folders_through_the_command_line(runs, tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert "is a file" in refused(monkeypatch, "vae.py", "--save_dir", a_file)
    if os.geteuid() != 0:                                 # root writes into read-only folders anyway
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        assert "cannot write" in refused(monkeypatch, "vae.py", "--save_dir", read_only / "run")
    procs = {"proc": start_script("vae.py", "--save_dir", "/proc/vi_test/run"),
             "eval": start_script("vae.py", "--eval_only", "--checkpoint", runs / "one" / "model.pt", "--save_dir", a_file),
             "print_every": start_script("vae.py", "--print_every", "0", "--save_dir", tmp_path / "p")}
    out = finish(procs)
    one_line_error(*out["proc"], "cannot write to --save_dir /proc/vi_test/run")
    one_line_error(*out["eval"], "is a file")
    assert "test:" not in out["eval"][1]                  # refused before the evaluation, not after it
    one_line_error(*out["print_every"], "--print_every")


# ------------------------------------------------------------------------------------------------
# Text input quirks.

def test_text_markers_bom_and_undecodable_bytes(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_bytes(b"\xef\xbb\xbfthe cat sat\n<s> the dog </s>\nthe cat \xff ran\n")  # BOM first
    (folder / "valid.txt").write_text("the cat\n")
    (folder / "test.txt").write_text("the dog\n")
    ds = data.load(types.SimpleNamespace(dataset="text", data_dir=str(folder), train_size=0, seed=1, device="cpu"))
    out = capsys.readouterr().out
    assert len(ds.vocab) == len(set(ds.vocab))                          # no duplicate <s> / </s>
    assert "the" in ds.vocab and not any("\ufeff" in w for w in ds.vocab)
    assert f"{folder / 'train.txt'}: 2 literal <s> / </s>" in out
    assert f"{folder / 'train.txt'}: 1 undecodable byte" in out
    index = {w: i for i, w in enumerate(ds.vocab)}
    rows = sorted(r.tolist() for t in ds.by_length["train"].values() for r in t)
    assert [data.BOS, data.UNK, index["the"], index["dog"], data.UNK, data.EOS] in rows


# ------------------------------------------------------------------------------------------------
# Round two: flags that were accepted and ignored or misread, Ctrl-C, a full disk.

def script_refused(monkeypatch, script, *argv):
    """A script's own flag checks, run in this process up to the line that refuses (before any data is read)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, script), run_name="__test__")
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


ROUND_TWO = {      # a90e84f: a traceback (seed, examples: after the test), or trained while ignoring the flag
    "seed_huge": ("vae.py", ["--seed", "1180591620717411303424"], "--seed must be in [0, 2^63 - 1]"),
    "seed_negative": ("vae.py", ["--seed", "-1"], "--seed"),
    "examples_huge": ("vae.py", ["--examples", "1000000000"], "--examples must be at most 100"),
    "eval_size": ("vae.py", ["--eval_size", "-1"], "--eval_size must be >= 0"),
    "emb_dim_images": ("vae.py", ["--dataset", "synthetic_images", "--emb_dim", "8"], "--emb_dim is for text"),
    "bias_images": ("vae.py", ["--dataset", "omniglot", "--bias", "0"], "--bias is for text"),
    "dropout_images": ("iwae.py", ["--dataset", "synthetic_images", "--dropout", "0.2"], "--dropout is for text"),
    "image_net_text": ("vae.py", ["--image_net", "mlp"], "--image_net is for images"),
    "lr_nan": ("vae.py", ["--lr", "nan"], "--lr must be a finite number"),
    "svi_clip": ("svi.py", ["--svi_clip", "-1"], "--svi_clip >= 0"),
    "momentum": ("savae.py", ["--momentum", "-3"], "0 <= --momentum < 1"),
    "svi_lr_nan": ("svi.py", ["--svi_lr", "nan"], "--svi_lr must be a finite number"),
    "svi_lr_zero": ("savae.py", ["--svi_lr", "0"], "--svi_lr > 0"),
}


@pytest.mark.parametrize("case", sorted(ROUND_TWO))
def test_flags_that_were_ignored_or_crashed_are_refused_before_any_work(case, tmp_path, monkeypatch):
    script, flags, fragment = ROUND_TWO[case]
    assert fragment in script_refused(monkeypatch, script, *flags, "--save_dir", tmp_path / "run")
    assert not (tmp_path / "run" / "model.pt").exists()


def test_help_shows_the_seed_and_its_default():
    parser = common.add_shared_args(argparse.ArgumentParser(formatter_class=common.HelpFormatter))
    assert "seeds every random draw (0 to 2^63 - 1) (default: 783435)" in " ".join(parser.format_help().split())


def test_divergence_names_the_methods_own_step_size_too():
    args = types.SimpleNamespace(save_dir="runs/x", lr=1.0, svi_lr=1e9)
    for epoch, advice in ((1, "start again with a lower --lr or --svi_lr"), (3, "or start again with a lower --svi_lr")):
        with pytest.raises(SystemExit) as stop:
            common.diverged(args, "training -elbo", math.nan, epoch)
        assert advice in str(stop.value), str(stop.value)


def test_ctrl_c_is_one_line_that_says_what_is_saved(runs, tmp_path):
    """Before: a 20-line KeyboardInterrupt traceback. Now one line; model.pt holds the finished epoch, and
    --resume continues from it."""
    folder = tmp_path / "interrupted"
    argv, how = _command("vae.py", [*tiny(), "--epochs", "100000", "--save_dir", folder])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **how,   # Ctrl-C is not ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (as in a background job)
    deadline = time.time() + 120
    while not (folder / "model.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and "Traceback" not in output, output
    assert output.strip().splitlines()[-1] == f"error: interrupted (Ctrl-C); {folder / 'model.pt'} holds the last " \
        f"finished epoch: continue with python vae.py --resume --save_dir {folder}", output
    assert common.load_checkpoint(str(folder / "model.pt"))["state"]["epoch"] >= 1


def test_a_run_killed_before_its_reports_says_how_to_make_them(runs, tmp_path, monkeypatch, capsys):
    """Killed between metrics.json and the reports, --resume said "nothing to do" and the reports never appeared."""
    one = copy_run(runs, "one", tmp_path)
    monkeypatch.setattr(sys, "argv", ["vae.py", "--resume", "--save_dir", str(one)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, "vae.py"), run_name="__test__")
    assert stop.value.code == 0 and f"nothing to do (python analysis.py {one} writes its reports again" in \
        capsys.readouterr().out


def test_a_full_disk_is_named_for_the_checkpoint_and_the_reports(tmp_path, monkeypatch):
    import analysis
    path = tmp_path / "model.pt"

    def disk_full(obj, f):
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: types.SimpleNamespace(total=1, used=1, free=0))
    with pytest.raises(SystemExit, match=r"cannot write the checkpoint .* \(no space left on device\); .*--resume"):
        common.save_checkpoint(str(path), {})
    assert not path.exists() and os.listdir(tmp_path) == []
    if os.path.exists("/dev/full"):                      # writing there fails as a full disk does
        with pytest.raises(SystemExit, match=r"^error: cannot write /dev/full \(No space left on device\)"):
            analysis.write("/dev/full", "x" * 100000)
    from matplotlib.figure import Figure
    monkeypatch.setattr(Figure, "savefig", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    log = tmp_path / "run"
    log.mkdir()
    (log / "log.jsonl").write_text('{"epoch": 1, "lr": 1.0, "train": {"neg_elbo": 3.0}, "val": {"neg_elbo": 2.0}}\n')
    with pytest.raises(SystemExit, match=r"cannot write .*curves\.png \(No space left on device\)"):
        analysis.draw_curves([str(log)], str(log / "curves.png"))
