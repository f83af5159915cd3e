"""VAE training speed beside He et al.'s own code (jxhe/vae-lagging-encoder), same data, same sizes, same
machine (not collected by pytest; it takes about 4 minutes per run).

    git clone https://github.com/jxhe/vae-lagging-encoder ../jxhe     # outside this repository
    python bench/bench_jxhe.py --authors ../jxhe                       # ours against theirs, 2 rounds
    python bench/bench_jxhe.py --authors ../jxhe --root . --root ../before   # also an older checkout of ours

The corpus is random text shaped like Yahoo: --sentences training sentences (2,000) with lengths spread as
Yahoo's (mean about 78 words, at most 200) and Zipf-distributed words over a 20,000-word vocabulary. Both
codes batch sentences of equal length together (32 at most), so they do the same arithmetic: embeddings 128,
LSTMs 256, latent 32, dropout 0.5, SGD, clip 5, no bias in the projections (He et al.'s). Their text.py runs
unmodified: the only file added to their checkout is config/config_vi_bench.py. Each run trains 2 epochs and
both are timed the same way, from outside: every call of torch.nn.utils.clip_grad_norm_ (once per training
step in both) is stamped, and the rate is taken over the second epoch (the first holds He et al.'s extra
evaluations). Runs alternate between the codes, so that a drift of the machine hits both.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 20000


def write_corpus(folder, sentences, seed=0):
    """train/valid/test.txt; every word of the vocabulary appears in training. The test split is 6 sentences of
    5 words: He et al.'s code scores it with 500 samples at the end of a run and needs at least 6."""
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, VOCAB + 1)
    p /= p.sum()

    def draw(n):
        lengths = np.clip(rng.gamma(2.0, 39.0, n).astype(int) + 1, 1, 200)
        return [rng.choice(VOCAB, size=length, p=p) for length in lengths]
    train = draw(sentences)
    words = np.concatenate(train)
    if len(words) < VOCAB:
        raise SystemExit(f"error: --sentences {sentences} gives {len(words)} words, fewer than the {VOCAB}-word "
                         "vocabulary; use --sentences 400 or more")
    missing = np.setdiff1d(np.arange(VOCAB), words)
    words[rng.choice(len(words), size=len(missing), replace=False)] = missing
    train = np.split(words, np.cumsum([len(s) for s in train])[:-1])
    short = [rng.choice(VOCAB, size=5, p=p) for _ in range(6)]    # their 500-sample test needs 6 sentences
    splits = {"train": train, "valid": draw(32), "test": short}
    for name, rows in splits.items():
        with open(os.path.join(folder, f"{name}.txt"), "w") as f:
            f.writelines(" ".join(f"w{w}" for w in s) + "\n" for s in rows)
    return sum(len(s) for s in train) / len(train)


def drive(out, cwd, script, argv):
    """Runs `script` unmodified as __main__ in `cwd`, stamping every gradient clip; writes the stamps."""
    import runpy
    import time

    import torch
    stamps, clip = [], torch.nn.utils.clip_grad_norm_

    def stamped_clip(*a, **k):
        stamps.append(time.perf_counter())
        return clip(*a, **k)
    torch.nn.utils.clip_grad_norm_ = stamped_clip
    os.chdir(cwd)
    sys.path.insert(0, cwd)
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        with open(out, "w") as f:
            json.dump({"stamps": stamps, "threads": torch.get_num_threads()}, f)


def second_epoch_rate(path, sentences):
    """Sentences per second over the second epoch's steps, from the clip stamps of a 2-epoch run."""
    with open(path) as f:
        stamps = json.load(f)["stamps"]
    steps = len(stamps) // 2
    seconds = stamps[2 * steps - 1] - stamps[steps]           # steps - 1 whole steps of the second epoch
    return sentences * (steps - 1) / steps / seconds, seconds / (steps - 1)


def run(name, command, cwd, out, log):
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--_drive", out, cwd, *command],
                              stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"error: the {name} run failed (exit {done.returncode}); its output is in {log}")


def main():
    if sys.argv[1:2] == ["--_drive"]:
        out, cwd, script, *argv = sys.argv[2:]
        return drive(out, cwd, script, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors", required=True, help="a checkout of github.com/jxhe/vae-lagging-encoder")
    parser.add_argument("--root", action="append", help="a checkout of ours (repeatable; default: this one)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each code, alternating")
    parser.add_argument("--sentences", type=int, default=2000, help="training sentences")
    parser.add_argument("--work", default=None, help="folder for the corpus, logs and runs (default: temporary)")
    args = parser.parse_args()
    authors = os.path.abspath(args.authors)
    if not os.path.isfile(os.path.join(authors, "text.py")) or not os.path.isdir(os.path.join(authors, "config")):
        raise SystemExit(f"error: {authors} is not a checkout of jxhe/vae-lagging-encoder (no text.py, config/); "
                         "clone it and pass its folder to --authors")
    roots = [os.path.abspath(r) for r in args.root or [ROOT]]
    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="bench_jxhe_")
    data_dir = os.path.join(work, "data")
    os.makedirs(data_dir, exist_ok=True)
    mean_length = write_corpus(data_dir, args.sentences)
    with open(os.path.join(authors, "config", "config_vi_bench.py"), "w") as f:
        f.write("params = " + repr({
            "enc_type": "lstm", "dec_type": "lstm", "nz": 32, "ni": 128, "enc_nh": 256, "dec_nh": 256,
            "dec_dropout_in": 0.5, "dec_dropout_out": 0.5, "batch_size": 32, "epochs": 2, "test_nepoch": 5,
            "train_data": f"{data_dir}/train.txt", "val_data": f"{data_dir}/valid.txt",
            "test_data": f"{data_dir}/test.txt"}) + "\n")
    codes = [("jxhe", authors, ["text.py", "--dataset", "vi_bench"])]
    for i, root in enumerate(roots, 1):
        codes.append((f"ours ({root})", root, [
            "vae.py", "--dataset", "text", "--data_dir", data_dir, "--emb_dim", "128", "--hidden_dim", "256",
            "--latent_dim", "32", "--batch_size", "32", "--epochs", "2", "--bias", "0", "--dropout", "0.5",
            "--optimizer", "sgd", "--lr", "1", "--clip", "5", "--iw_samples", "10", "--examples", "0",
            "--save_dir", os.path.join(work, f"run-{{round}}-{i}")]))
    print(f"corpus: {args.sentences} sentences, mean length {mean_length:.1f}, vocabulary {VOCAB}; work folder {work}")
    print("| round | code | s per step | sentences/s |\n|---|---|---|---|", flush=True)
    rates = {}
    for r in range(1, args.rounds + 1):
        for i, (name, cwd, command) in enumerate(codes):
            out = os.path.join(work, f"stamps-{r}-{i}.json")
            run(name, [c.format(round=r) for c in command], cwd, out, out[:-5] + ".log")
            per_second, per_step = second_epoch_rate(out, args.sentences)
            rates.setdefault(name, []).append(per_second)
            print(f"| {r} | {name} | {per_step:.3f} | {per_second:.1f} |", flush=True)
    theirs = np.mean(rates["jxhe"])
    for name, values in rates.items():
        print(f"{name}: mean {np.mean(values):.1f} sentences/s over {len(values)} runs, "
              f"{np.mean(values) / theirs:.2f}x jxhe's")


if __name__ == "__main__":
    main()
