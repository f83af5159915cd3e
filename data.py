"""Datasets and batching: He et al.'s synthetic text (built in memory from a seed), text corpora
(Yahoo, Yelp, PTB, or any folder of one-sentence-per-line files), Omniglot and synthetic binary images,
and Kim et al.'s synthetic text from an oracle generator that is kept (synthetic_oracle, at the end).

A sentence is stored as [<s>, w_1, ..., w_n, </s>]. Batches hold sentences of equal length, so there
is no padding; every sentence is used exactly once per epoch and the batch order is shuffled from
the seed by the dataset's own generator (saved in checkpoints, so a resumed run sees the same batches).
"""
import argparse
import collections
import glob
import math
import os

import torch
import torch.nn as nn

from common import LSTMDecoder, fail

SPECIALS = ["<s>", "</s>", "<unk>"]
BOS, EOS, UNK = 0, 1, 2
UNK_WORDS = {"<unk>", "_UNK"}        # PTB and the Yang et al. corpora already mark rare words
MARKERS = {"<s>", "</s>"}            # the sentence boundaries are added by encode, never read from the text
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "val"), "test": ("test",)}
SOURCES = {
    "yahoo": "the Yahoo Answers corpus of Yang et al. (2017), distributed with the code of "
             "Kim et al. (harvardnlp/sa-vae) and He et al. (jxhe/vae-lagging-encoder)",
    "yelp": "the Yelp corpus of Yang et al. (2017), distributed with He et al.'s code "
            "(jxhe/vae-lagging-encoder); lines may start with 'label<TAB>'",
    "ptb": "Mikolov's Penn Treebank (simple-examples/data/ptb.{train,valid,test}.txt)",
    "text": "your own corpus: one sentence per line, tokens separated by spaces",
    "omniglot": "Burda et al.'s 28x28 Omniglot, chardata.mat (yburda/iwae, datasets/OMNIGLOT), "
                "or a .pt file holding {'train': [N, 28, 28], 'test': [M, 28, 28]} grey levels in [0, 1]",
}


class TextData:
    """Sentences grouped by length, per split: {split: {length: LongTensor [count, length]}}."""

    kind = "text"

    def __init__(self, splits, vocab, seed, device="cpu"):
        self.vocab, self.vocab_size = vocab, len(vocab)
        self.by_length = {}
        for split, sentences in splits.items():
            groups = collections.defaultdict(list)
            for s in sentences:
                groups[len(s)].append(s)
            self.by_length[split] = {n: torch.tensor(g, dtype=torch.long, device=device)
                                     for n, g in sorted(groups.items())}
        self.generator = torch.Generator().manual_seed(seed)

    def size(self, split):
        return sum(len(t) for t in self.by_length[split].values())

    def steps_per_epoch(self, batch_size):
        return sum(math.ceil(len(t) / batch_size) for t in self.by_length["train"].values())

    def batches(self, split, batch_size, shuffle=False):
        """A list of [batch, length] tensors covering the split once (the last batch of a length may
        be smaller). With shuffle, sentences within a length and the batch order are permuted."""
        out = []
        for group in self.by_length[split].values():
            if shuffle:
                group = group[torch.randperm(len(group), generator=self.generator).to(group.device)]
            out.extend(group.split(batch_size))
        if shuffle:
            out = [out[i] for i in torch.randperm(len(out), generator=self.generator).tolist()]
        return out


# ----------------------------------------------------------------------------------------------
# Text files.

def find_split_file(data_dir, dataset, split):
    """train.txt / valid.txt / test.txt, or NAME.train.txt style; 'val' is accepted for 'valid'."""
    for name in SPLIT_NAMES[split]:
        path = os.path.join(data_dir, f"{name}.txt")
        if os.path.isfile(path):
            return path
        found = sorted(glob.glob(os.path.join(data_dir, f"*.{name}.txt")))
        if len(found) > 1:
            fail(f"{data_dir} holds several {split} files ({', '.join(found)}); keep one")
        if found:
            return found[0]
    where = "" if os.path.isabs(data_dir) else f" (relative to the current folder {os.getcwd()})"
    fail(f"no {split} file for --dataset {dataset}: expected {os.path.join(data_dir, split + '.txt')}{where} "
         f"(or {dataset}.{split}.txt). It is {SOURCES[dataset]}; set --data_dir to its folder")


def read_sentences(path):
    """Token lists, one per non-blank line, with an optional leading 'label<TAB>' removed; also returns how
    many blank lines were skipped. A UTF-8 byte-order mark is dropped (it is not part of the first word);
    bytes that are not UTF-8 are read as U+FFFD, with a warning that counts them."""
    with open(path, "rb") as f:
        raw = f.read()
    undecodable = raw.decode("utf-8", errors="replace").count("\ufffd") - raw.count("\ufffd".encode())
    if undecodable:
        print(f"warning: {path}: {undecodable} undecodable byte sequences (not UTF-8) read as U+FFFD", flush=True)
    sentences, blank = [], 0
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            head, tab, rest = line.partition("\t")
            if tab and head.strip().lstrip("-").isdigit():
                line = rest
            words = line.split()
            if words:
                sentences.append(words)
            else:
                blank += 1
    if not sentences:
        fail(f"{path} has no sentences (it is empty or blank); expected one sentence per line")
    literal = sum(w in MARKERS for s in sentences for w in s)
    if literal:
        print(f"warning: {path}: {literal} literal <s> / </s> tokens read as <unk> (every sentence gets its own "
              f"<s> and </s>)", flush=True)
    return sentences, blank


def build_vocab(sentences):
    """Special tokens, then training words by frequency (ties alphabetical); unk markers map to <unk>, and
    literal <s> / </s> in the text are not words (they map to <unk>: one vocabulary entry per token)."""
    counts = collections.Counter(w for s in sentences for w in s if w not in UNK_WORDS and w not in MARKERS)
    return SPECIALS + sorted(counts, key=lambda w: (-counts[w], w))


def encode(sentences, index):
    return [[BOS] + [index.get(w, UNK) for w in s] + [EOS] for s in sentences]


def load_text(args):
    words, lines = {}, []
    for split in SPLIT_NAMES:
        path = find_split_file(args.data_dir, args.dataset, split)
        words[split], blank = read_sentences(path)
        in_file = len(words[split])
        if split == "train" and args.train_size:
            words["train"] = words["train"][:args.train_size]
        used = f"{len(words[split])} of {in_file}" if len(words[split]) < in_file else f"{in_file}"
        lines.append(f"{split} {used} sentences from {path}" + (f" ({blank} blank lines skipped)" if blank else ""))
    vocab = build_vocab(words["train"])
    index = {w: i for i, w in enumerate(vocab)}
    index.update({w: UNK for w in UNK_WORDS | MARKERS})
    print("data: " + "; ".join(lines) + f"; vocabulary {len(vocab)}", flush=True)
    return TextData({split: encode(s, index) for split, s in words.items()}, vocab, args.seed, args.device)


# ----------------------------------------------------------------------------------------------
# He et al. 2019, Appendix B.1: synthetic text whose latent structure is known.

def he_generator(seed, words=1000, emb_dim=100, hidden_dim=100):
    """The generator: an LSTM whose initial state is a linear map of z in R^2 and whose logits also
    get a linear map of z. Weights are large (uniform(-1, 1), and (-3, 3) for z -> logits, as in the
    authors' generator) so that sentences depend strongly on z. As there, the z -> state map and the
    vocabulary projection have no bias (bias=False): with uniform(-1, 1) biases there, aggressive
    training found no use for z even in its first epoch (README)."""
    g = torch.Generator().manual_seed(seed)
    gen = LSTMDecoder(words, emb_dim, hidden_dim, latent_dim=2, z_to_output=True, bias=False).eval()
    with torch.no_grad():
        for p in gen.parameters():
            nn.init.uniform_(p, -1.0, 1.0, generator=g)
        nn.init.uniform_(gen.z_out.weight, -3.0, 3.0, generator=g)
    return gen, g


def synthetic_sentences(seed=20190506, count=20000, length=10, words=1000):
    """z from a mixture of 4 unit-variance Gaussians at (+-2, +-2); first word uniform, the remaining
    length-1 words sampled from the generator. Word ids shifted past the special tokens."""
    gen, g = he_generator(seed, words)
    centers = torch.tensor([[-2.0, -2.0], [2.0, 2.0], [-2.0, 2.0], [2.0, -2.0]])
    z = centers[torch.randint(4, (count,), generator=g)] + torch.randn(count, 2, generator=g)
    first = torch.randint(words, (count,), generator=g)
    rest = gen.sample(z, first, length - 1, generator=g)
    body = torch.cat([first.unsqueeze(1), rest], 1) + len(SPECIALS)
    full = torch.cat([torch.full((count, 1), BOS), body, torch.full((count, 1), EOS)], 1)
    return full.tolist(), z


def load_synthetic(args):
    sentences, _ = synthetic_sentences()
    splits = {"train": sentences[:16000], "valid": sentences[16000:18000], "test": sentences[18000:]}
    if args.train_size:
        splits["train"] = splits["train"][:args.train_size]
    vocab = SPECIALS + [f"w{i}" for i in range(1000)]
    print(f"data: He et al. synthetic, {len(splits['train'])}/2000/2000 sentences of 10 words, "
          f"vocabulary {len(vocab)}", flush=True)
    return TextData(splits, vocab, args.seed, args.device)


def load(args):
    """The dataset named by args.dataset."""
    if args.dataset == "synthetic":
        return load_synthetic(args)
    if args.dataset == "synthetic_images":
        return load_synthetic_images(args)
    if args.dataset == "synthetic_oracle":
        return load_synthetic_oracle(args)
    if not os.path.isdir(args.data_dir):
        where = "" if os.path.isabs(args.data_dir) else f" (relative to the current folder {os.getcwd()})"
        fail(f"data folder {args.data_dir}{where} does not exist; --dataset {args.dataset} needs "
             f"{SOURCES[args.dataset]} there (or pass --data_dir)")
    return load_omniglot(args) if args.dataset == "omniglot" else load_text(args)


# ----------------------------------------------------------------------------------------------
# Binary 28x28 images.

class ImageData:
    """Grey-level images [N, 1, 28, 28] per split. Training images are binarised afresh every epoch
    (each call of batches("train", shuffle=True)); validation and test were binarised once, with a fixed
    seed, when the data was loaded (Burda et al. 2016; He et al. 2019)."""
    kind = "image"
    vocab = None

    def __init__(self, splits, seed, device="cpu", binarize_seed=0):
        fixed = torch.Generator().manual_seed(binarize_seed)
        self.images = {"train": splits["train"].to(device)}
        for split in ("valid", "test"):
            self.images[split] = torch.bernoulli(splits[split], generator=fixed).to(device)
        self.generator = torch.Generator().manual_seed(seed)

    def size(self, split):
        return len(self.images[split])

    def steps_per_epoch(self, batch_size):
        return math.ceil(len(self.images["train"]) / batch_size)

    def batches(self, split, batch_size, shuffle=False):
        images = self.images[split]
        if shuffle:
            images = images[torch.randperm(len(images), generator=self.generator).to(images.device)]
        if split == "train":
            noise = torch.rand(images.shape, generator=self.generator).to(images.device)
            images = (noise < images).float()
        return list(images.split(batch_size))


def read_omniglot_mat(path):
    """chardata.mat: 'data' [784, 24345] and 'testdata' [784, 8070], grey levels in [0, 1], each column an
    image flattened column-major (MATLAB order), so it is reshaped to 28x28 and transposed."""
    try:
        from scipy.io import loadmat
    except ImportError:
        fail("reading chardata.mat needs scipy (pip install scipy)")
    try:
        raw = loadmat(path)
        columns = {"train": raw["data"], "test": raw["testdata"]}
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line
        fail(f"cannot read {path} as Omniglot's chardata.mat ({type(e).__name__}: {e})")
    return {split: torch.tensor(c.T, dtype=torch.float32).view(-1, 28, 28).transpose(1, 2).contiguous()
            for split, c in columns.items()}


def load_omniglot(args, valid_count=1345):
    """Omniglot from DATA_DIR/chardata.mat or DATA_DIR/omniglot.pt; the validation split is taken from
    train with a fixed seed (valid_count images)."""
    mat, pt = os.path.join(args.data_dir, "chardata.mat"), os.path.join(args.data_dir, "omniglot.pt")
    if os.path.isfile(mat):
        splits = read_omniglot_mat(mat)
    elif os.path.isfile(pt):
        try:
            splits = {k: torch.as_tensor(v, dtype=torch.float32).view(-1, 28, 28) for k, v in torch.load(pt).items()}
        except Exception as e:  # noqa: BLE001
            fail(f"cannot read {pt} ({type(e).__name__}); expected {SOURCES['omniglot']}")
    else:
        fail(f"no Omniglot file: expected {mat} (or {pt}). It is {SOURCES['omniglot']}; set --data_dir to its folder")
    if "valid" not in splits:
        order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(0))
        splits["valid"], splits["train"] = splits["train"][order[:valid_count]], splits["train"][order[valid_count:]]
    return image_data(args, splits, "Omniglot")


def synthetic_images(seed=20160205, count=1200):
    """Binary-image data generated from a seed, so the image path runs offline: each image is a bright
    disc whose centre and radius are drawn at random (a 3-D latent cause), blurred at the edge; pixels
    are then Bernoulli draws. Returns grey levels [count, 28, 28]."""
    g = torch.Generator().manual_seed(seed)
    centre = 7 + 14 * torch.rand(count, 2, generator=g)
    radius = 3 + 5 * torch.rand(count, 1, 1, generator=g)
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    distance = ((rows - centre[:, 0, None, None]) ** 2 + (cols - centre[:, 1, None, None]) ** 2).sqrt()
    return torch.sigmoid(2 * (radius - distance)) * 0.96 + 0.02


def image_data(args, splits, name):
    if args.train_size:
        splits["train"] = splits["train"][:args.train_size]
    print(f"data: {name}, {len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])} images", flush=True)
    return ImageData({k: v.unsqueeze(1) for k, v in splits.items()}, args.seed, args.device)


def load_synthetic_images(args):
    images = synthetic_images()
    return image_data(args, {"train": images[:1000], "valid": images[1000:1100], "test": images[1100:]},
                      "synthetic binary images")


# ----------------------------------------------------------------------------------------------
# Kim et al. 2018, Sec. 5.1: text drawn from an oracle generator whose parameters are kept, so that
# log p(x|z) of the data is known exactly (the --oracle flag trains inference against it, and the grid
# in common.py gives the true log p(x)). Sentences are [<s>, w_1, ..., w_5] with no </s>: the generator
# emits exactly five words, so generator.log_prob(x, z) is exactly the log p(x|z) the data was drawn from.

ORACLE_SPLITS = {"train": 5000, "valid": 500, "test": 500}     # Kim et al.: 5000 training sequences
ORACLE_LENGTH, ORACLE_WORDS = 5, 1000


def oracle_generator(seed=20180710, words=ORACLE_WORDS, emb_dim=100, hidden_dim=100, z_scale=8.0):
    """z in R^2 ~ N(0, I); h_t = LSTM(h_{t-1}, x_t) with 100 units and 100-dim embeddings; x_{t+1} ~
    softmax(W h_t + U z + b): z enters only at the output, so the LSTM state does not depend on it.
    (Kim et al. used an MLP on [h_t, z]; a linear map keeps the generator a common.LSTMDecoder.)
    It is an LSTMDecoder whose z -> input and z -> initial-state weights are zero; LSTM and output weights
    uniform(-1, 1), U uniform(-z_scale, z_scale): large, so that z matters (measured on the grid: the true
    posterior is 2.8 nats from the prior on average, 2.1 to 4.0, with sd 0.3 per axis; -log p(x) is about 18).
    The special tokens get a bias of -1e4 and no z weight: they never occur.
    Returns the frozen generator (eval mode, requires_grad False) and the generator of random numbers."""
    g = torch.Generator().manual_seed(seed)
    gen = LSTMDecoder(len(SPECIALS) + words, emb_dim, hidden_dim, latent_dim=2, z_to_output=True).eval()
    with torch.no_grad():
        for p in gen.parameters():
            nn.init.uniform_(p, -1.0, 1.0, generator=g)
        nn.init.uniform_(gen.z_out.weight, -z_scale, z_scale, generator=g)
        gen.lstm.weight_ih_l0[:, emb_dim:] = 0          # z is not joined to the input embeddings
        gen.init_state.weight.zero_()                   # h_0 = c_0 = 0 whatever z is
        gen.init_state.bias.zero_()
        gen.out.bias[:len(SPECIALS)] = -1e4             # <s>, </s>, <unk>: probability exp(-1e4) = 0
        gen.z_out.weight[:len(SPECIALS)] = 0
    for p in gen.parameters():
        p.requires_grad_(False)
    return gen, g


def oracle_sentences(seed=20180710):
    """Every split's sentences [count, 1 + 5] (ids) and their z [count, 2], drawn from oracle_generator:
    z ~ N(0, I), then five words sampled after <s>. Returns (generator, {split: (sentences, z)})."""
    gen, g = oracle_generator(seed)
    splits = {}
    for split, count in ORACLE_SPLITS.items():
        z = torch.randn(count, 2, generator=g)
        first = torch.full((count,), BOS)
        words = gen.sample(z, first, ORACLE_LENGTH, generator=g)
        if words.min() < len(SPECIALS):                 # impossible by construction; the seed is fixed
            raise RuntimeError("the oracle generator emitted a special token")
        splits[split] = (torch.cat([first.unsqueeze(1), words], 1), z)
    return gen, splits


def load_synthetic_oracle(args):
    gen, splits = oracle_sentences()
    if args.train_size:
        splits["train"] = tuple(t[:args.train_size] for t in splits["train"])
    vocab = SPECIALS + [f"w{i}" for i in range(ORACLE_WORDS)]
    sizes = "/".join(str(len(splits[s][0])) for s in ORACLE_SPLITS)
    print(f"data: Kim et al. synthetic (oracle generator, z in R^2), {sizes} sentences of "
          f"{ORACLE_LENGTH} words, vocabulary {len(vocab)}", flush=True)
    dataset = TextData({split: s.tolist() for split, (s, _) in splits.items()}, vocab, args.seed, args.device)
    dataset.true_decoder = gen.to(args.device)          # --oracle: the decoder; also scores the data exactly
    # each sentence's z, row for row with by_length[split][6] (one length only, so the order is kept)
    dataset.true_z = {split: z.to(args.device) for split, (_, z) in splits.items()}
    return dataset


# ----------------------------------------------------------------------------------------------
# Writing a built-in dataset out as text, so another codebase can be run on exactly our data.

BUILT_IN_TEXT = {"synthetic": load_synthetic, "synthetic_oracle": load_synthetic_oracle}


def export_text(name, folder):
    """Writes FOLDER/{train,valid,test}.txt for a built-in text dataset: one sentence per line, words
    separated by spaces, without <s> and </s> (every reader adds its own). Files are written to a
    temporary name and renamed; an existing file is never overwritten. Returns the paths."""
    if name not in BUILT_IN_TEXT:
        fail(f"--export takes a built-in text dataset ({', '.join(BUILT_IN_TEXT)}), not {name}")
    paths = {split: os.path.join(folder, f"{split}.txt") for split in SPLIT_NAMES}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing:
        fail(f"{existing[0]} already exists; pass an empty --out folder (nothing was written)")
    args = argparse.Namespace(train_size=0, seed=0, device="cpu")
    dataset = BUILT_IN_TEXT[name](args)
    os.makedirs(folder, exist_ok=True)
    for split, path in paths.items():
        # one length per split for the built-in data, so by_length keeps the generated order
        rows = [s for t in dataset.by_length[split].values() for s in t.tolist()]
        lines = [" ".join(dataset.vocab[i] for i in s if i not in (BOS, EOS)) + "\n" for s in rows]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)
        print(f"wrote {len(lines)} sentences to {path}", flush=True)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a built-in text dataset as train.txt, valid.txt, "
                                                 "test.txt (one sentence per line), e.g. to run another "
                                                 "codebase on exactly our data.")
    parser.add_argument("--export", required=True, choices=sorted(BUILT_IN_TEXT), help="the dataset to write")
    parser.add_argument("--out", required=True, help="the folder to write into (created if missing)")
    cli = parser.parse_args()
    export_text(cli.export, cli.out)
