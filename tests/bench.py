"""Speed of the shared pieces (not collected by pytest): VAE training examples/sec and IW-NLL
sentences/sec, on the synthetic preset and on a Yahoo-sized network over random sentences.

    python tests/bench.py                       # both sizes on the CPU
    python tests/bench.py --size yahoo --cuda   # one size on the GPU
"""
import argparse
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

SIZES = {  # vocabulary, sentence length (words), embedding, hidden, latent, batch
    "synthetic": dict(vocab=1003, length=10, emb_dim=50, hidden_dim=50, latent_dim=1, batch=16),
    "yahoo": dict(vocab=20001, length=60, emb_dim=512, hidden_dim=1024, latent_dim=32, batch=32),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(size, device, train_steps, eval_sentences, iw_samples):
    s = SIZES[size]
    args = types.SimpleNamespace(latent_dim=s["latent_dim"], emb_dim=s["emb_dim"], hidden_dim=s["hidden_dim"],
                                 dropout=0.5, device=device, image_net="pixelcnn", oracle=False)
    encoder, decoder = common.build_model(args, types.SimpleNamespace(kind="text", vocab_size=s["vocab"]))
    optimizer = torch.optim.SGD([*encoder.parameters(), *decoder.parameters()], lr=1.0)
    x = torch.randint(3, s["vocab"], (s["batch"], s["length"] + 2), device=device)

    def step():   # the VAE step of vae.py
        mean, logvar = encoder(x)
        rec = -decoder.log_prob(x, common.reparameterize(mean, logvar))[:, 0]
        loss = (rec + common.kl_normal(mean, logvar)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        common.clip_grad([encoder, decoder], 5.0)
        optimizer.step()

    step(), step()                                   # warm up
    sync(device)
    start = time.time()
    for _ in range(train_steps):
        step()
    sync(device)
    train_rate = train_steps * s["batch"] / (time.time() - start)

    encoder.eval(), decoder.eval()
    batches = list(torch.randint(3, s["vocab"], (eval_sentences, s["length"] + 2), device=device).split(s["batch"]))
    common.evaluate(encoder, decoder, batches[:1], 2)
    sync(device)
    start = time.time()
    common.evaluate(encoder, decoder, batches, iw_samples)
    sync(device)
    eval_rate = eval_sentences / (time.time() - start)
    print(f"{size:9s} {device.type}: train {train_rate:8.1f} examples/s (batch {s['batch']}, {train_steps} steps) | "
          f"IW-NLL {eval_rate:8.2f} sentences/s ({iw_samples} samples, {eval_sentences} sentences)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["synthetic", "yahoo", "both"], default="both")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--iw_samples", type=int, default=500)
    args = parser.parse_args()
    device = torch.device("cuda" if args.cuda else "cpu")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    big = args.cuda   # the Yahoo-sized network is slow on a CPU: fewer steps and sentences there
    if args.size in ("synthetic", "both"):
        bench("synthetic", device, train_steps=200, eval_sentences=320, iw_samples=args.iw_samples)
    if args.size in ("yahoo", "both"):
        bench("yahoo", device, train_steps=50 if big else 3, eval_sentences=320 if big else 4,
              iw_samples=args.iw_samples)
