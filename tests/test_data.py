"""Text parsing, vocabulary, batching, the synthetic generators (He et al.'s text, Kim et al.'s oracle data), Omniglot's
loader and binarisation, and --export."""
import argparse
import collections
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import common
import data
from conftest import ROOT


def write_corpus(folder, train, valid, test, names=("train.txt", "valid.txt", "test.txt")):
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in zip(names, (train, valid, test)):
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def text_args(folder, **kw):
    return types.SimpleNamespace(dataset="text", data_dir=str(folder), train_size=0, seed=5, device="cpu", **kw)


def test_parsing_strips_labels_skips_blank_lines_and_maps_unknown_words(tmp_path, capsys):
    folder = write_corpus(tmp_path / "c",
                          ["3\tthe cat sat", "", "1\tthe dog _UNK", "   ", "the cat ran"],
                          ["the bird sat"], ["a cat <unk>"],
                          names=("yelp.train.txt", "yelp.val.txt", "yelp.test.txt"))
    ds = data.load(text_args(folder))
    assert "2 blank lines skipped" in capsys.readouterr().out
    index = {w: i for i, w in enumerate(ds.vocab)}
    assert ds.vocab[:3] == data.SPECIALS and "3" not in index and "_UNK" not in index
    assert ds.vocab[3:5] == ["the", "cat"]                     # by frequency
    sentences = sorted(row.tolist() for t in ds.by_length["train"].values() for row in t)
    expected = sorted([[data.BOS, index["the"], index["cat"], index["sat"], data.EOS],
                       [data.BOS, index["the"], index["dog"], data.UNK, data.EOS],
                       [data.BOS, index["the"], index["cat"], index["ran"], data.EOS]])
    assert sentences == expected
    (valid,), (test,) = ds.batches("valid", 4), ds.batches("test", 4)
    assert valid.tolist() == [[data.BOS, index["the"], data.UNK, index["sat"], data.EOS]]  # unseen word
    assert test.tolist() == [[data.BOS, data.UNK, index["cat"], data.UNK, data.EOS]]


def test_batches_use_every_sentence_once_with_equal_lengths_and_seeded_order(tmp_path):
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(50, (int(n),), generator=g))
             for n in torch.randint(1, 12, (300,), generator=g)]
    ds = data.load(text_args(write_corpus(tmp_path / "c", lines, lines[:10], lines[:10])))
    all_rows = collections.Counter(tuple(r.tolist()) for t in ds.by_length["train"].values() for r in t)
    assert sum(all_rows.values()) == 300
    orders = []
    for epoch in range(2):
        batches = ds.batches("train", 16, shuffle=True)
        assert len(batches) == ds.steps_per_epoch(16)
        seen = collections.Counter(tuple(r.tolist()) for b in batches for r in b)
        assert seen == all_rows                                     # nothing lost, nothing repeated
        assert all(b.shape[0] <= 16 for b in batches)              # equal length: a batch is a tensor
        orders.append([b[0].tolist() for b in batches])
    assert orders[0] != orders[1]                                   # reshuffled every epoch
    again = data.load(text_args(tmp_path / "c"))
    assert [b[0].tolist() for b in again.batches("train", 16, shuffle=True)] == orders[0]   # seeded


def test_train_size_takes_the_first_sentences(tmp_path):
    folder = write_corpus(tmp_path / "c", ["a b", "c d e", "f", "g h"], ["a"], ["b"])
    args = text_args(folder)
    args.train_size = 2
    ds = data.load(args)
    assert ds.size("train") == 2 and set(ds.vocab[3:]) == {"a", "b", "c", "d", "e"}


def test_eval_size_takes_the_first_validation_and_test_examples_of_every_dataset(tmp_path):
    """--train_size did not shrink validation and test (a 320-sentence SA-VAE smoke run spent 427 of 537 s on them)."""
    folder = write_corpus(tmp_path / "c", ["a b", "c d e", "f"], ["a", "b c", "d"], ["b", "c", "e f"])
    ds = data.load(text_args(folder, eval_size=2))
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (3, 2, 2)
    assert sorted(len(t[0]) for t in ds.by_length["valid"].values()) == [3, 4]      # "a", "b c": the first two
    ds = data.load(types.SimpleNamespace(dataset="synthetic_images", train_size=30, eval_size=7, seed=0, device="cpu"))
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (30, 7, 7)      # (every loader calls data.first)


def test_utf16_files_and_splits_of_unknown_words_are_named(tmp_path, capsys):
    """A UTF-16 file was read as "2 undecodable byte sequences" with every word garbled; splits whose words are all
    <unk> trained and reported an NLL without a word."""
    folder = write_corpus(tmp_path / "c", ["a b c", "d e"], ["x y z"], ["a q r"])
    data.load(text_args(folder))
    out = capsys.readouterr().out
    assert "warning: 100% of the valid words are not in the training vocabulary" in out
    assert "warning: 67% of the test words" in out
    (folder / "train.txt").write_text("a b c\nd e\n", encoding="utf-16")
    with pytest.raises(SystemExit, match=r"train\.txt is not UTF-8 text: it holds NUL bytes \(UTF-16"):
        data.load(text_args(folder))


def test_omniglot_pt_files_without_a_split_or_with_pixels_above_one_get_one_line(tmp_path):
    args = types.SimpleNamespace(data_dir=str(tmp_path), dataset="omniglot", train_size=0, seed=0, device="cpu")
    for content, fragment in (({"train": torch.rand(5, 28, 28)}, r"holds 'train' \[5, 28, 28\] in \[.*\]: it needs 'train' and 'test'"),
                              ({"train": torch.rand(5, 784) * 255, "test": torch.rand(2, 784)}, r"'train' \[5, 28, 28\] in \[.*, 25\d\.\d+\]"),
                              (torch.rand(5, 28, 28), r"cannot read .*omniglot\.pt \(AttributeError\)")):
        torch.save(content, tmp_path / "omniglot.pt")
        with pytest.raises(SystemExit, match=fragment):
            data.load(args)
    torch.save({"train": torch.rand(5, 784), "test": torch.rand(2, 28, 28)}, tmp_path / "omniglot.pt")
    assert data.load_omniglot(args, valid_count=2).size("train") == 3


def test_export_checks_its_folder_before_generating_anything(tmp_path, monkeypatch):
    """The export did 18 s of work, then crashed on a --out that was a file or could not be written."""
    monkeypatch.setitem(data.BUILT_IN_TEXT, "synthetic", lambda args: pytest.fail("generated before checking --out"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match=r"--out .*a_file is a file, not a folder"):
        data.export_text("synthetic", str(tmp_path / "a_file"))
    with pytest.raises(SystemExit, match=r"cannot write to --out /proc/vi_test/out"):
        data.export_text("synthetic", "/proc/vi_test/out")


def test_missing_and_empty_files_give_one_clear_line_naming_the_download_command(tmp_path):
    with pytest.raises(SystemExit, match=r"data folder .*nowhere does not exist.*Yahoo Answers.*"
                                         r"run python data\.py --download yahoo --data_dir .*nowhere to fetch it"):
        data.load(types.SimpleNamespace(dataset="yahoo", data_dir=str(tmp_path / "nowhere"),
                                        train_size=0, seed=0, device="cpu"))
    (tmp_path / "ptb").mkdir()
    with pytest.raises(SystemExit, match=r"no train file for --dataset ptb: .*train\.txt \(or ptb\.train\.txt\).*"
                                         r"Penn Treebank.*run python data\.py --download ptb --data_dir "):
        data.load(types.SimpleNamespace(dataset="ptb", data_dir=str(tmp_path / "ptb"),
                                        train_size=0, seed=0, device="cpu"))
    folder = write_corpus(tmp_path / "c", ["a b"], ["a"], ["b"])
    (folder / "test.txt").unlink()
    with pytest.raises(SystemExit, match=r"no test file .*test\.txt"):
        data.load(text_args(folder))
    (folder / "test.txt").write_text("\n\n")
    with pytest.raises(SystemExit, match=r"test\.txt has no sentences"):
        data.load(text_args(folder))


def test_synthetic_data_is_he_et_al_sized_and_deterministic():
    first, z = data.synthetic_sentences(count=300)
    again, _ = data.synthetic_sentences(count=300)
    assert first == again and z.shape == (300, 2)
    t = torch.tensor(first)
    assert t.shape == (300, 12) and (t[:, 0] == data.BOS).all() and (t[:, -1] == data.EOS).all()
    assert t[:, 1:-1].min() >= len(data.SPECIALS) and t[:, 1:-1].max() < len(data.SPECIALS) + 1000
    # z matters: sentences from the same mixture component share far more words than across
    # components (the generator's z -> logits weights are large).
    component = (z[:, 0] > 0).long() * 2 + (z[:, 1] > 0).long()
    words = [set(s[1:-1]) for s in first]
    def overlap(same):
        pairs = [(i, j) for i in range(100) for j in range(i + 1, 100) if (component[i] == component[j]) == same]
        return sum(len(words[i] & words[j]) for i, j in pairs) / len(pairs)
    assert overlap(True) > 2 * overlap(False)


def test_export_writes_the_built_in_data_as_text_and_never_overwrites(tmp_path):
    out = tmp_path / "synthetic"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "data.py"), "--export", "synthetic", "--out", str(out)],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sentences, _ = data.synthetic_sentences()             # the expected data, here, while the export runs
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, stderr
    lines = {split: (out / f"{split}.txt").read_text().splitlines() for split in ("train", "valid", "test")}
    assert [len(v) for v in lines.values()] == [16000, 2000, 2000]
    vocab = data.SPECIALS + [f"w{i}" for i in range(1000)]
    for split, first in (("train", 0), ("valid", 16000), ("test", 18000)):
        assert lines[split][0].split() == [vocab[i] for i in sentences[first][1:-1]]
    assert all(len(line.split()) == 10 for line in lines["test"])
    # read back through --dataset text: the same sentences (ids differ: that vocabulary is by frequency)
    args = argparse.Namespace(dataset="text", data_dir=str(out), train_size=0, seed=0, device="cpu")
    back = data.load_text(args)
    assert back.size("train") == 16000 and back.vocab_size <= 1003
    again = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--export", "synthetic", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert len((out / "train.txt").read_text().splitlines()) == 16000


ORACLE_ARGS = types.SimpleNamespace(dataset="synthetic_oracle", train_size=0, seed=0, device="cpu")


def test_synthetic_oracle_data_is_drawn_from_its_true_decoder():
    dataset = data.load(ORACLE_ARGS)
    decoder = dataset.true_decoder
    assert isinstance(decoder, common.LSTMDecoder) and dataset.vocab_size == 1003
    assert {s: dataset.size(s) for s in ("train", "valid", "test")} == {"train": 5000, "valid": 500, "test": 500}
    x, z = dataset.by_length["train"][6], dataset.true_z["train"]
    assert list(dataset.by_length["train"]) == [6] and (x[:, 0] == data.BOS).all()
    assert x[:, 1:].min() >= len(data.SPECIALS) and x.max() < 1003   # five words, never <s>, </s> or <unk>
    assert not any(p.requires_grad for p in decoder.parameters())
    assert decoder.init_state.weight.abs().max() == 0 and decoder.lstm.weight_ih_l0[:, 100:].abs().max() == 0
    again = data.load(ORACLE_ARGS)
    assert torch.equal(again.by_length["train"][6], x)                # the same data on every machine

    with torch.no_grad():
        true = decoder.log_prob(x, z.unsqueeze(1))[:, 0]
        # the first word's log-likelihood under the decoder's own logits matches its expectation (minus the
        # entropy) over the sampled data: sampling and log_prob describe the same distribution
        logits, _ = decoder.logits(x[:, :1], z)
        log_p = logits[:, 0].log_softmax(-1)
        observed = log_p.gather(1, x[:, 1:2])[:, 0]
        expected = (log_p.exp() * log_p).sum(-1)
        diff = observed - expected
        assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff)), (observed.mean(), expected.mean())

        perturbed = data.oracle_generator()[0]
        perturbed.out.weight.add_(0.3 * torch.randn(perturbed.out.weight.shape, generator=torch.Generator().manual_seed(0)))
        assert (true - perturbed.log_prob(x, z.unsqueeze(1))[:, 0]).mean() > 0.5     # a KL: > 0 for the true one
        shuffled = decoder.log_prob(x, z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))].unsqueeze(1))
        assert (true - shuffled[:, 0]).mean() > 5                      # z matters: a few nats of information
        assert -true.mean() / 5 < math.log(1000) - 1                   # and the words are far from uniform


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
