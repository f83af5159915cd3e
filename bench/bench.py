"""Speed of every method (not collected by pytest): the training step of each of the five scripts, and
evaluation with each kind of inference (the encoder's; SVI's K steps), at sizes from the papers.

    python bench/bench.py                         # CPU: synthetic and cpu sizes, a few minutes
    python bench/bench.py --cuda                  # GPU: synthetic and yahoo sizes
    python bench/bench.py --size yahoo --cuda --json bench.json
    python bench/bench.py --root ../old_checkout  # the same measurement of another checkout's scripts

It measures the code that trains: each script is run through its command line (runpy, --epochs 0, on a
corpus of random sentences written to a temporary folder), and its own train_step and infer are timed.
Rates are examples (sentences) per second, each from at least --budget seconds of work after a warm-up
(or from the warm-up call itself where that alone took --budget).
"""
import argparse
import contextlib
import io
import json
import os
import runpy
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = {  # vocabulary, words per sentence, embedding, LSTM units, latent, batch, sentences scored per evaluation
    "tiny": dict(vocab=50, length=6, emb_dim=8, hidden_dim=8, latent_dim=2, batch=4, scored=4),
    "synthetic": dict(vocab=1000, length=10, emb_dim=50, hidden_dim=50, latent_dim=1, batch=16, scored=16),  # He et al.
    "cpu": dict(vocab=20000, length=60, emb_dim=128, hidden_dim=256, latent_dim=32, batch=32, scored=2),   # Yahoo, small nets
    "yahoo": dict(vocab=20000, length=60, emb_dim=512, hidden_dim=1024, latent_dim=32, batch=32, scored=32),  # Kim, He
}
METHODS = ["vae", "svi", "savae", "lagging", "iwae"]


def write_corpus(folder, size, seed=0):
    """train/valid/test.txt of random sentences of one length; the training split holds every word, so the
    vocabulary has size['vocab'] words."""
    g = torch.Generator().manual_seed(seed)
    vocab, length = size["vocab"], size["length"]
    count = max(2 * size["batch"], -(-vocab // length))
    train = torch.randint(vocab, (count, length), generator=g)
    train.view(-1)[:vocab] = torch.arange(vocab)
    for split, rows in (("train", train), ("valid", train[:size["batch"]]), ("test", train[:2])):
        with open(os.path.join(folder, f"{split}.txt"), "w") as f:
            f.writelines(" ".join(f"w{i}" for i in row) + "\n" for row in rows.tolist())


def load_script(root, method, size, folder, cuda, extra):
    """Run METHOD.py with --epochs 0 on the corpus in `folder`; returns the script's globals (its train_step,
    infer, modules, dataset and args), with its printing swallowed."""
    argv = [f"{method}.py", "--dataset", "text", "--data_dir", folder, "--emb_dim", size["emb_dim"],
            "--hidden_dim", size["hidden_dim"], "--latent_dim", size["latent_dim"], "--batch_size", size["batch"],
            "--epochs", 0, "--iw_samples", 1, "--examples", 0, "--save_dir", os.path.join(folder, f"run-{method}"), *extra]
    argv += ["--cuda"] if cuda else []
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [str(a) for a in argv], [root]
    for name in ("common", "data", "analysis"):          # each root's own modules
        sys.modules.pop(name, None)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return runpy.run_path(os.path.join(root, f"{method}.py"), run_name="__bench__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def rate(work, examples, device, budget, warm_up=None):
    """Examples per second of work() (which handles `examples` examples): one warm-up call (of warm_up, a
    cheaper call of the same code, if given), then calls timed over at least `budget` seconds. A warm-up call of
    work() itself that takes `budget` or more is the measurement (savae.py's step at the cpu size takes about
    a minute: its one-time costs are lost in it)."""
    start = time.perf_counter()
    (warm_up or work)()
    sync(device)
    seconds = time.perf_counter() - start
    if warm_up is None and seconds >= budget:
        return examples / seconds, seconds, 1
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < budget:
        work()
        calls += 1
        sync(device)
    seconds = time.perf_counter() - start
    return calls * examples / seconds, seconds, calls


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_size(root, name, cuda, budget, iw_samples, svi_steps, inner_steps, methods):
    size = SIZES[name]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_corpus(folder, size)
        for method in methods:
            extra = {"svi": ["--svi_steps", svi_steps], "savae": ["--svi_steps", svi_steps],
                     "lagging": ["--inner_steps", inner_steps, "--window", inner_steps + 1]}.get(method, [])
            g = load_script(root, method, size, folder, cuda, extra)
            device, dataset, common = g["args"].device, g["dataset"], g["common"]
            torch.manual_seed(0)
            x = next(iter(dataset.batches("train", size["batch"])))
            for m in g["modules"].values():
                m.train()
            if method == "lagging":        # an aggressive batch: inner_steps encoder-only steps, one decoder step
                pool = dataset.batches("train", size["batch"])

                def work():
                    g["encoder_steps"](x, 1.0, pool)
                    g["train_step"](x, 1.0, ("decoder",))
                what = f"training, aggressive ({inner_steps} encoder steps + 1)"
            else:
                def work():
                    g["train_step"](x, 1.0)
                what = "training" + (f" (K = {svi_steps})" if method in ("svi", "savae") else "")
            rows.append(dict(size=name, method=method, what=what, **result(rate(work, x.shape[0], device, budget))))
            if method in ("vae", "svi"):   # evaluation: the encoder's inference, and SVI's from the prior
                for m in g["modules"].values():
                    m.eval()
                batches = [x[:size["scored"]]]
                model = [g["infer"], g["decoder"]] + ([g["prior"]] if "prior" in g else [])   # older roots: no prior
                what = f"test IW-NLL, {iw_samples} samples" + (f", SVI inference (K = {svi_steps})" if method == "svi" else "")
                rows.append(dict(size=name, method=method, what=what, **result(rate(
                    lambda: common.evaluate(*model, batches, iw_samples), len(batches[0]), device,
                    budget, warm_up=lambda: common.evaluate(*model, batches, 2)))))
            print(format_row(rows[-2] if method in ("vae", "svi") else rows[-1]), flush=True)
            if method in ("vae", "svi"):
                print(format_row(rows[-1]), flush=True)
    return rows


def result(measured):
    per_second, seconds, calls = measured
    return {"examples_per_s": round(per_second, 3), "seconds": round(seconds, 2), "calls": calls}


def format_row(row):
    return f"| {row['size']} | {row['method']} | {row['what']} | {row['examples_per_s']:.2f} | {row['seconds']:.1f} |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[*SIZES, "default"], default="default",
                        help="default: synthetic and cpu on a CPU, synthetic and yahoo with --cuda")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated scripts to measure")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed work per measurement")
    parser.add_argument("--iw_samples", type=int, default=500, help="importance samples of the test IW-NLL")
    parser.add_argument("--svi_steps", type=int, default=20, help="K of svi.py and savae.py")
    parser.add_argument("--inner_steps", type=int, default=10, help="encoder-only steps per lagging.py batch")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 matmuls on the GPU (torch.set_float32_matmul_precision('high')): to measure the gain")
    parser.add_argument("--root", default=ROOT, help="the checkout whose scripts are measured")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    methods = args.methods.split(",")
    for ok, message in [   # one line each, before any measurement
        (not args.cuda or torch.cuda.is_available(), "--cuda was given but PyTorch sees no CUDA GPU here; drop --cuda"),
        (set(methods) <= set(METHODS), f"--methods takes some of {','.join(METHODS)}"),
        (0 < args.budget < 3600 and args.iw_samples >= 1 and args.svi_steps >= 0 and args.inner_steps >= 1,
         "--budget must be in (0, 3600) s, --iw_samples >= 1, --svi_steps >= 0 and --inner_steps >= 1"),
        (all(os.path.isfile(os.path.join(args.root, f"{m}.py")) for m in methods),
         f"--root {args.root} is not a checkout of these scripts (no {', '.join(m + '.py' for m in methods)})"),
        (not args.json or os.path.isdir(os.path.dirname(args.json) or ".") and not os.path.exists(args.json),
         f"--json {args.json}: its folder must exist and the file must not (nothing is overwritten)")]:
        if not ok:
            raise SystemExit(f"error: {message}")
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    sizes = [args.size] if args.size != "default" else ["synthetic", "yahoo" if args.cuda else "cpu"]
    device = torch.cuda.get_device_name() if args.cuda else f"CPU, {torch.get_num_threads()} threads"
    device += ", TF32 matmuls" if args.tf32 else ""
    print(f"torch {torch.__version__}, {device}, root {os.path.abspath(args.root)}")
    print("| size | method | what | examples/s | timed s |\n|---|---|---|---|---|", flush=True)
    rows = []
    for name in sizes:
        rows += bench_size(args.root, name, args.cuda, args.budget, args.iw_samples, args.svi_steps,
                           args.inner_steps, methods)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": device, "root": os.path.abspath(args.root),
                       "sizes": {n: SIZES[n] for n in sizes}, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
