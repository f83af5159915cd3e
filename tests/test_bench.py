"""tests/bench.py runs (at a tiny size) and measures every method's training step and both kinds of evaluation,
so that the benchmark cannot go stale unnoticed."""
import json
import subprocess
import sys

from conftest import ROOT


def test_bench_runs_every_method_at_a_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tests/bench.py", "--size", "tiny", "--budget", "0.05", "--iw_samples", "3",
                           "--svi_steps", "2", "--inner_steps", "2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    measured = {(r["method"], r["what"].split(" ")[0].rstrip(",")) for r in rows}
    assert measured == {("vae", "training"), ("svi", "training"), ("savae", "training"), ("lagging", "training"),
                        ("iwae", "training"), ("vae", "test"), ("svi", "test")}
    assert all(r["examples_per_s"] > 0 and r["calls"] >= 1 and r["seconds"] > 0 for r in rows)
    assert proc.stdout.count("| tiny |") == len(rows)                  # the printed table has every row
