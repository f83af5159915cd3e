"""Text parsing, vocabulary, batching and the synthetic generator."""
import argparse
import collections
import os
import subprocess
import sys
import types

import pytest
import torch

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


def test_missing_and_empty_files_give_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match=r"data folder .*nowhere does not exist.*Yahoo Answers"):
        data.load(types.SimpleNamespace(dataset="yahoo", data_dir=str(tmp_path / "nowhere"),
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
