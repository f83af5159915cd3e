"""python data.py --download, against a local HTTP server that serves small stand-ins for the real files
(the expected line counts are patched down where a download is meant to succeed)."""
import hashlib
import http.server
import io
import os
import re
import socket
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import data
from conftest import ROOT

TEXT = {"train.txt": 5, "valid.txt": 2, "test.txt": 2}


def lines(count, tag):
    return "".join(f"{tag} sentence number {i} here\n" for i in range(count)).encode()


def fake_mat(train=5, test=2):
    scipy_io = pytest.importorskip("scipy.io")
    buffer = io.BytesIO()
    scipy_io.savemat(buffer, {"data": np.random.default_rng(0).random((784, train)),
                              "testdata": np.random.default_rng(1).random((784, test))})
    return buffer.getvalue()


@pytest.fixture
def server():
    """Serves `files` {url path: bytes}; `truncate` paths send half the body after announcing all of it;
    every request is logged as (path, Range header)."""
    state = types.SimpleNamespace(files={}, truncate=set(), log=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state.log.append((self.path, self.headers.get("Range")))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if self.path in state.truncate else body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def no_checksums(monkeypatch, name):
    """The stand-ins are not the real files: a mirror's files are checked against the real sources' checksums."""
    expect = data.DOWNLOADS[name]["expect"]
    monkeypatch.setitem(data.DOWNLOADS[name], "sources", [{"url": "https://example.org/", "files": {t: (t, None) for t in expect}}])


def serve_text(server, prefix, counts=TEXT):
    for name, count in counts.items():
        server.files[f"{prefix}/{name}"] = lines(count, name.split(".")[0])


def test_download_puts_files_where_the_loaders_read_them_and_a_second_run_does_nothing(server, tmp_path, monkeypatch,
                                                                                       capsys):
    monkeypatch.setitem(data.DOWNLOADS["ptb"], "expect", dict(TEXT))
    monkeypatch.setitem(data.DOWNLOADS["omniglot"], "expect", {"chardata.mat": (5, 2)})
    monkeypatch.setenv("VI_DATA_MIRROR", server.url + "/mirror/")
    no_checksums(monkeypatch, "ptb"), no_checksums(monkeypatch, "omniglot")
    serve_text(server, "/mirror/ptb")
    server.files["/mirror/omniglot/chardata.mat"] = fake_mat()
    ptb, omniglot = tmp_path / "ptb", tmp_path / "omniglot"
    data.download("ptb", str(ptb))
    data.download("omniglot", str(omniglot))
    assert sorted(os.listdir(ptb)) == ["test.txt", "train.txt", "valid.txt"]       # no .part left
    assert sorted(os.listdir(omniglot)) == ["chardata.mat"]
    loaded = data.load(types.SimpleNamespace(dataset="ptb", data_dir=str(ptb), train_size=0, seed=0, device="cpu"))
    assert [loaded.size(s) for s in ("train", "valid", "test")] == [5, 2, 2]
    images = data.read_omniglot_mat(str(omniglot / "chardata.mat"))
    assert images["train"].shape == (5, 28, 28) and images["test"].shape == (2, 28, 28)
    capsys.readouterr()
    requests = len(server.log)
    data.download("ptb", str(ptb))
    data.download("omniglot", str(omniglot))
    assert len(server.log) == requests                                              # nothing fetched again
    out = capsys.readouterr().out
    assert out.count("nothing to do") == 2
    (ptb / "valid.txt").write_text("one line\n")                                    # never overwritten
    with pytest.raises(SystemExit, match=r"valid\.txt exists but it has 1 lines, not 2; move it away"):
        data.download("ptb", str(ptb))
    assert (ptb / "valid.txt").read_text() == "one line\n"


def test_sources_are_tried_in_order_and_checksums_are_checked(server, tmp_path, monkeypatch):
    monkeypatch.delenv("VI_DATA_MIRROR", raising=False)
    monkeypatch.setitem(data.DOWNLOADS["yahoo"], "expect", dict(TEXT))
    serve_text(server, "/first")
    del server.files["/first/test.txt"]                                  # the first source lacks one file
    second = {name: lines(count, "second " + name) for name, count in TEXT.items()}
    for name, body in second.items():
        server.files[f"/second/yahoo.{name}"] = body
    md5 = {name: "md5:" + hashlib.md5(body).hexdigest() for name, body in second.items()}
    first = {"url": server.url + "/first/", "files": {name: (name, None) for name in TEXT}}
    monkeypatch.setitem(data.DOWNLOADS["yahoo"], "sources", [
        first, {"url": server.url + "/second/", "files": {name: (f"yahoo.{name}", md5[name]) for name in TEXT}}])
    folder = tmp_path / "yahoo"
    data.download("yahoo", str(folder))
    # every file from the one source that had them all, so train.txt is not the first source's
    assert {name: (folder / name).read_bytes() for name in TEXT} == second
    assert sorted(os.listdir(folder)) == ["test.txt", "train.txt", "valid.txt"]    # no .part left
    # the first source alone: train.txt and valid.txt arrive, test.txt does not; none of them is left behind
    monkeypatch.setitem(data.DOWNLOADS["yahoo"], "sources", [first])
    with pytest.raises(SystemExit, match=r"first/test\.txt \(HTTP 404"):
        data.download("yahoo", str(tmp_path / "partial"))
    assert not (tmp_path / "partial").exists()
    # a wrong checksum: an error naming the URL, and nothing left under any name
    wrong = dict(first, files={name: (name, "sha256:" + "0" * 64) for name in TEXT})
    server.files["/first/test.txt"] = lines(2, "test")
    monkeypatch.setitem(data.DOWNLOADS["yahoo"], "sources", [wrong])
    with pytest.raises(SystemExit, match=r"first/train\.txt \(wrong content: its sha256 checksum is \w+, not 0+\)"):
        data.download("yahoo", str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()
    assert data.checksum(str(folder / "train.txt"), "sha256") == hashlib.sha256(second["train.txt"]).hexdigest()


def test_a_part_file_left_by_an_interrupted_run_is_fetched_again_from_the_start(server, tmp_path, monkeypatch):
    monkeypatch.setitem(data.DOWNLOADS["ptb"], "expect", dict(TEXT))
    monkeypatch.setenv("VI_DATA_MIRROR", server.url)
    no_checksums(monkeypatch, "ptb")
    serve_text(server, "/ptb")
    folder = tmp_path / "ptb"
    folder.mkdir()
    (folder / "train.txt.part").write_bytes(server.files["/ptb/train.txt"][:40])     # the start of the right file
    (folder / "valid.txt.part").write_bytes(b"not the start of valid.txt\n" * 100)   # longer than the right one
    data.download("ptb", str(folder))
    assert all(asked is None for _, asked in server.log) and len(server.log) == 3   # no Range: whole files
    for name in TEXT:
        assert (folder / name).read_bytes() == server.files[f"/ptb/{name}"]
    assert sorted(os.listdir(folder)) == ["test.txt", "train.txt", "valid.txt"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_failures_are_one_line_naming_the_url_and_leave_no_final_file(server, tmp_path):
    serve_text(server, "/short/ptb")                                     # 5 lines where 42068 are expected
    server.files["/cut/ptb/train.txt"] = lines(3000, "train")
    server.truncate.add("/cut/ptb/train.txt")
    cases = {"short": server.url + "/short", "cut": server.url + "/cut", "missing": server.url + "/none",
             "refused": f"http://127.0.0.1:{free_port()}"}
    runs = {}
    for case, mirror in cases.items():                                   # in parallel: each run imports torch
        runs[case] = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "data.py"), "--download", "ptb", "--data_dir", str(tmp_path / case)],
            cwd=ROOT, env={**os.environ, "VI_DATA_MIRROR": mirror, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    expected = {"short": r"/short/ptb/train\.txt \(wrong content: it has 5 lines, not 42068\)",
                "cut": r"/cut/ptb/train\.txt \(the connection closed after \d+ of \d+ bytes\)",
                "missing": r"/none/ptb/train\.txt \(HTTP 404",
                "refused": r"127\.0\.0\.1:\d+/ptb/train\.txt \(cannot reach it: .*refused"}
    for case, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode != 0, (case, out, err)
        assert "Traceback" not in out + err, (case, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: could not download ptb: tried "), err
        assert re.search(expected[case], err), (case, err)
        public = data.DOWNLOADS["ptb"]["sources"][0]["url"]                 # where the files are, not the mirror
        assert f"By hand: save {public}ptb.train.txt as {tmp_path / case / 'train.txt'}" in err, err
        assert not (tmp_path / case).exists(), case                    # no file, no .part, no empty folder


def test_helpers_name_the_command_and_count_right(tmp_path):
    assert data.download_command("ptb", os.path.join("data", "ptb")) == "python data.py --download ptb"
    assert data.download_command("text", "corpus") is None
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    assert data.checksum(str(tmp_path / "a.txt"), "git") == "ce013625030ba8dba906f756967f9e9ca394464a"  # as git gives
    (tmp_path / "b.txt").write_bytes(b"one\ntwo")                                  # no newline at the end
    assert data.content_problem(str(tmp_path / "b.txt"), 2) is None
    assert data.content_problem(str(tmp_path / "b.txt"), 3) == "it has 2 lines, not 3"


def test_a_mirror_is_checked_as_the_sources_are_and_all_tries_every_dataset(server, tmp_path, monkeypatch, capsys):
    """A mirror's files were checked by line count only (one byte changed: accepted as verified); a mirror that is
    not a URL gave "unknown url type"; --download all stopped at the first dataset that failed."""
    monkeypatch.setitem(data.DOWNLOADS["ptb"], "expect", dict(TEXT))
    monkeypatch.setitem(data.DOWNLOADS["yelp"], "expect", dict(TEXT))
    right = {name: lines(count, name) for name, count in TEXT.items()}
    sha = {name: "sha256:" + hashlib.sha256(body).hexdigest() for name, body in right.items()}
    monkeypatch.setitem(data.DOWNLOADS["ptb"], "sources", [{"url": "https://example.org/ptb/",
                                                            "files": {n: (f"ptb.{n}", sha[n]) for n in TEXT}}])
    changed = dict(right, **{"valid.txt": right["valid.txt"].replace(b"sentence", b"Sentence", 1)})  # same lines
    server.files.update({f"/m/ptb/{name}": body for name, body in changed.items()})
    monkeypatch.setenv("VI_DATA_MIRROR", server.url + "/m")
    with pytest.raises(SystemExit, match=r"/m/ptb/valid\.txt \(wrong content: its sha256 checksum is .*By hand: save "
                                         r"https://example\.org/ptb/ptb\.train\.txt as"):
        data.download("ptb", str(tmp_path / "ptb"))
    assert not (tmp_path / "ptb").exists()                                          # no .part left, no folder
    server.files["/m/ptb/valid.txt"] = right["valid.txt"]
    no_checksums(monkeypatch, "yelp")
    server.files.update({f"/m/yelp/{name}": body for name, body in right.items()})
    monkeypatch.chdir(tmp_path)                                                     # --download all: data/NAME here
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        data.main(types.SimpleNamespace(export=None, out=None, data_dir=None, download="all"))
    out = capsys.readouterr().out
    assert str(stop.value) == "error: could not download yahoo, omniglot (each one's reason is above); yelp, ptb in place"
    for name in ("yahoo", "omniglot"):
        assert f"{name}: error: could not download {name}: tried {server.url}/m/{name}/" in out
    assert sorted(os.listdir(tmp_path / "data")) == ["ptb", "yelp"]
    assert (tmp_path / "data" / "ptb" / "valid.txt").read_bytes() == right["valid.txt"]
    monkeypatch.setenv("VI_DATA_MIRROR", "notaurl")
    with pytest.raises(SystemExit, match=r"VI_DATA_MIRROR=notaurl is not a URL"):
        data.download("ptb", str(tmp_path / "other"))
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("VI_DATA_MIRROR", server.url + "/m")
    with pytest.raises(SystemExit, match=r"--data_dir .*a_file is a file, not a folder"):
        data.download("ptb", str(tmp_path / "a_file"))
    with pytest.raises(SystemExit, match=r"cannot write to --data_dir /proc/vi_test/ptb"):
        data.download("ptb", "/proc/vi_test/ptb")
