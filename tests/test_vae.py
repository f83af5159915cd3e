"""vae.py through its command line: metrics, determinism, resume, the LM baseline, --oracle and --gaps, bad input."""
import json

import pytest
import torch

import common
import data
from conftest import METRIC_KEYS, TINY, TINY_TEXT, read_metrics, run_script, run_scripts, succeeded


def without_time(metrics):
    return {k: v for k, v in metrics.items() if k != "train_seconds"}


def test_smoke_and_same_seed_same_metrics(tmp_path, text_dir):
    """(The default synthetic data runs through vae.py and lagging.py in test_lagging's three-seed comparison.)"""
    text = ["--dataset", "text", "--data_dir", text_dir, *TINY_TEXT]
    succeeded(run_scripts({name: [("vae.py", *TINY, *text, "--save_dir", tmp_path / name)] for name in "ab"}))
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert a["method"] == "vae" and a["dataset"] == "text" and a["num_examples"] == 10
    assert a["nll"] <= a["neg_elbo"] + 0.05 and a["ppl"] > 1
    assert without_time(a) == without_time(b)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and {"train", "val", "lr", "kl_weight"} <= set(log[0])


def test_text_folder_and_eval_only(tmp_path, text_dir):
    run_script("vae.py", "--dataset", "text", "--data_dir", text_dir, *TINY, *TINY_TEXT,
               "--save_dir", tmp_path / "t")
    trained = read_metrics(tmp_path / "t")
    assert trained["dataset"] == "text" and trained["num_examples"] == 10
    proc = run_script("vae.py", "--dataset", "text", "--data_dir", text_dir, "--eval_only",
                      "--checkpoint", tmp_path / "t" / "model.pt", "--iw_samples", "4",
                      "--batch_size", "4", "--save_dir", tmp_path / "e")
    # a new file that names the weights; the training run's metrics.json is never touched
    evaluated = json.loads((tmp_path / "e" / "metrics_eval_vae_epoch1.json").read_text())
    assert set(evaluated) == METRIC_KEYS | {"checkpoint", "checkpoint_epoch", "trained_by"}
    assert evaluated["trained_by"] == "vae" and evaluated["checkpoint_epoch"] == 1
    assert "latent_dim=2" in proc.stdout                   # the model's shape came from the checkpoint
    assert evaluated["kl"] == pytest.approx(trained["kl"], rel=1e-5)   # same weights, same q


def test_interrupted_and_resumed_run_matches_straight_run(tmp_path, text_dir):
    args = ["--dataset", "text", "--data_dir", text_dir, *TINY_TEXT, "--iw_samples", "4", "--val_iw_samples", "2"]
    interrupted_run = [("vae.py", *args, "--epochs", "1", "--save_dir", tmp_path / "resumed"),       # then resumed
                       ("vae.py", *args, "--epochs", "3", "--save_dir", tmp_path / "resumed", "--resume")]
    straight_run = [("vae.py", *args, "--epochs", "3", "--save_dir", tmp_path / "straight")]
    succeeded(run_scripts({"resumed": interrupted_run, "straight": straight_run}))                  # side by side
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert without_time(straight) == without_time(resumed)
    logs = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("straight", "resumed")]
    assert logs[0] == logs[1] and len(logs[0]) == 3


def test_latent_dim_zero_is_an_exact_language_model(tmp_path, text_dir):
    run_script("vae.py", "--dataset", "text", "--data_dir", text_dir, *TINY, *TINY_TEXT,
               "--latent_dim", "0", "--save_dir", tmp_path / "lm")
    m = read_metrics(tmp_path / "lm")
    assert m["kl"] == 0 and m["mi"] == 0 and m["au"] == 0
    assert m["nll"] == pytest.approx(m["neg_elbo"], abs=1e-4) == pytest.approx(m["rec"], abs=1e-4)


def one_line_error(proc, *fragments):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_gets_one_clear_line(tmp_path, text_dir):
    (text_dir / "valid.txt").write_text("")
    garbage, foreign = tmp_path / "garbage.pt", tmp_path / "foreign.pt"
    garbage.write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}}, foreign)
    cases = {"nan": (["--train_size", "64", "--lr", "1e8", "--clip", "0", "--print_every", "2", "--save_dir",
                      tmp_path / "nan"], "training -elbo became nan", "--lr"),         # first: it trains
             "yahoo": (["--dataset", "yahoo", "--data_dir", tmp_path / "missing"], "missing", "Yahoo"),
             "empty": (["--dataset", "text", "--data_dir", text_dir], "valid.txt has no sentences")}
    for path in (garbage, foreign, tmp_path / "absent.pt"):
        cases[path.name] = (["--eval_only", "--checkpoint", path], str(path))
    if not torch.cuda.is_available():
        cases["cuda"] = (["--cuda"], "--cuda")
    procs = run_scripts({name: [("vae.py", *argv)] for name, (argv, *_) in cases.items()})    # two at a time
    for name, (_, *fragments) in cases.items():
        one_line_error(procs[name], *fragments)


def test_oracle_flag_freezes_the_decoder_and_gaps_go_to_their_file(tmp_path):
    tiny = ["--dataset", "synthetic_oracle", "--oracle", "--train_size", "100", "--iw_samples", "4",
            "--val_iw_samples", "2"]
    procs = run_scripts({                                             # two at a time, the training run first
        "vae": [("vae.py", *tiny, "--epochs", "1", "--gaps", "8", "--save_dir", tmp_path / "v")],
        "hidden_dim": [("vae.py", *tiny, "--hidden_dim", "20", "--save_dir", tmp_path / "h")],
        "svi": [("svi.py", *tiny, "--epochs", "0", "--svi_steps", "3", "--save_dir", tmp_path / "s")],
        "svi_trains": [("svi.py", *tiny, "--save_dir", tmp_path / "s2")],
        "no_dataset": [("vae.py", "--oracle", "--save_dir", tmp_path / "x")]})
    # the sizes come from the true generator: a contradicting size is refused before any work
    one_line_error(procs["hidden_dim"], "true generator", "hidden_dim is 100", "drop --hidden_dim")
    succeeded({name: procs[name] for name in ("vae", "svi")})
    assert "hidden_dim=100" in procs["vae"].stdout and "latent_dim=2" in procs["vae"].stdout
    saved = common.load_checkpoint(tmp_path / "v" / "model.pt")
    true = data.oracle_generator()[0].state_dict()
    for modules in (saved["modules"], saved["best_modules"]):
        assert modules["decoder"].keys() == true.keys()
        assert all(torch.equal(modules["decoder"][k], true[k]) for k in true)
        fresh_encoder = common.LSTMEncoder(1003, 100, 100, 2).state_dict()
        assert not all(torch.equal(modules["encoder"][k], fresh_encoder[k]) for k in fresh_encoder)
    assert set(json.loads((tmp_path / "v" / "metrics.json").read_text())) == METRIC_KEYS
    gaps = json.loads((tmp_path / "v" / "gaps.json").read_text())
    assert gaps["method"] == "vae" and gaps["examples"] == 8 and gaps["log_px_by"] == "grid"
    assert gaps["amortization_gap"] > -3 * gaps["amortization_gap_se"] - 0.01
    assert abs(gaps["elbo_method"] + gaps["amortization_gap"] + gaps["approximation_gap"] - gaps["log_px"]) < 1e-3

    # svi.py has nothing to learn with the true generator: it scores with --epochs 0 and refuses to train
    assert set(json.loads((tmp_path / "s" / "metrics.json").read_text())) == METRIC_KEYS
    one_line_error(procs["svi_trains"], "--epochs 0")
    one_line_error(procs["no_dataset"], "synthetic_oracle")
