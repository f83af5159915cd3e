import contextlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METRIC_KEYS = {"method", "dataset", "nll", "neg_elbo", "rec", "kl", "mi", "au", "ppl", "iw_samples",
               "num_examples", "train_seconds"}
TINY = ["--train_size", "64", "--epochs", "1", "--iw_samples", "4", "--val_iw_samples", "2"]
TINY_TEXT = ["--emb_dim", "8", "--hidden_dim", "8", "--latent_dim", "2", "--batch_size", "4"]


def _command(script, args):
    """The command line of a method script, and how to run it: from the repository root, one thread
    (these runs are tiny, and extra threads only add contention)."""
    return ([sys.executable, os.path.join(ROOT, script), *map(str, args)],
            dict(cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True))


def start_script(script, *args):
    """Start a method script through its command line; returns the Popen (stderr joined to stdout)."""
    argv, how = _command(script, args)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **how)


def run_script(script, *args, check=True):
    """Run a method script through its command line; returns the CompletedProcess."""
    argv, how = _command(script, args)
    proc = subprocess.run(argv, capture_output=True, timeout=600, **how)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


class ScriptPool:
    """Runs chains of method-script command lines, `workers` chains at a time (each run uses one thread, so two at
    once use two cores). A chain is [(script, *args), ...], run in order up to the first run that fails (a resume
    after the run it resumes). niceness > 0: at a lower priority, where the system has priorities, and without
    the 600 s limit of a run (a run starved by the tests in front is not hung); hurry() ends both."""

    def __init__(self, workers=2, niceness=0):
        self.pool, self.niceness, self.running, self.closed = ThreadPoolExecutor(workers), niceness, set(), False

    def submit(self, chains):
        """chains: {name: chain}, started in the order given (put the longest first); {name: Future of the
        CompletedProcess of the chain's last run}."""
        return {name: self.pool.submit(self._run_chain, runs) for name, runs in chains.items()}

    def _run_chain(self, runs):
        for script, *args in runs:
            argv, how = _command(script, args)
            if self.closed:
                return subprocess.CompletedProcess(argv, -1, "", "not run: the session ended first")
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **how)
            self.running.add(proc)
            if self.niceness:
                self._renice(proc, self.niceness)
            try:
                stdout, stderr = proc.communicate(timeout=None if self.niceness else 600)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
            finally:
                self.running.discard(proc)
            done = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
            if proc.returncode != 0:
                break
        return done

    @staticmethod
    def _renice(proc, niceness):
        """This process's niceness plus `niceness`, where the system allows it."""
        if hasattr(os, "setpriority"):
            with contextlib.suppress(OSError):           # it exited already, or raising a priority is not allowed
                os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + niceness)

    def hurry(self):
        """Normal priority from now on: the runs still to start, and (where allowed) those running."""
        self.niceness = 0
        for proc in list(self.running):
            self._renice(proc, 0)

    def close(self):
        """Stop: kill the runs still going (a session that ended early) and start no more."""
        self.closed = True
        for proc in list(self.running):
            proc.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


def run_scripts(chains, workers=2):
    """Run chains of method-script command lines (see ScriptPool), two at a time, and wait for them all: {name:
    the CompletedProcess of the chain's last run}; the caller checks them (see `succeeded`)."""
    pool = ScriptPool(workers)
    try:
        return {name: future.result() for name, future in pool.submit(chains).items()}
    finally:
        pool.close()


def succeeded(procs):
    """Assert that every run of run_scripts exited with 0, showing the output of those that did not."""
    failed = {name: proc for name, proc in procs.items() if proc.returncode != 0}
    assert not failed, "\n".join(f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
                                  for name, p in failed.items())


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics) == METRIC_KEYS
    return metrics


def pytest_collection_modifyitems(items):
    """Tests that wait for background runs (the `background` fixture) go last: the runs have the whole session."""
    items.sort(key=lambda item: "background" in item.fixturenames)


@pytest.fixture(scope="session")
def background(background_pool):
    """background(__name__): ({name: CompletedProcess}, folder) of the calling module's background_runs(folder),
    waiting for those not finished (see background_pool below)."""
    return background_pool


@pytest.fixture(autouse=True, scope="session")
def background_pool(request, tmp_path_factory):
    """Runs that start with the session. A test module may define `background_runs(folder)`, returning chains as
    ScriptPool takes them; when one of its tests is selected, they start before the first test, two at a time at
    a low priority (nice 10): they take the core that the rest of the suite leaves idle (tests that compute in
    this process use one thread, and many run one script at a time) and barely slow the tests in front. The
    tests that use them (through the `background` fixture) run last."""
    pool = ScriptPool(workers=2, niceness=10)
    modules = {item.module.__name__: item.module for item in request.session.items
               if hasattr(item.module, "background_runs")}
    started = {}
    for name, module in sorted(modules.items()):
        folder = tmp_path_factory.mktemp(name)
        started[name] = (pool.submit(module.background_runs(folder)), folder)

    def results(module_name):
        pool.hurry()                      # the session waits for them now: nothing else to make room for
        futures, folder = started[module_name]
        return {name: future.result(timeout=600) for name, future in futures.items()}, folder

    yield results
    pool.close()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests that compute in this process use one thread: their tensors are small, and a second OpenMP thread only
    adds waiting, badly so on a busy machine (lagging.py's inner loop: 0.6 s on one thread, 70 s on two while
    another process used a core). The scripts run as subprocesses get OMP_NUM_THREADS=1 (_command)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_text_corpus(folder):
    """A tiny one-sentence-per-line corpus with train/valid/test files (60/10/10 sentences) in a new folder."""
    words = "the a cat dog sat ran on mat log big small red".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 4)) for i in range(80)]
    folder.mkdir()
    for name, part in (("train", lines[:60]), ("valid", lines[60:70]), ("test", lines[70:])):
        (folder / f"{name}.txt").write_text("\n".join(part) + "\n")
    return folder


@pytest.fixture
def text_dir(tmp_path):
    """A tiny one-sentence-per-line corpus with train/valid/test files."""
    return write_text_corpus(tmp_path / "corpus")
