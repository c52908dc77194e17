"""The benchmark tools run end to end at small sizes and print their tables (figures come from full runs)."""

import subprocess
import sys

from conftest import REPO, fresh_process_env


def _tool(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=600,
                            env=fresh_process_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_pager_prints_throughput_beside_memcpy():
    out = _tool("tools/bench_pager.py", "--labels", "1e5", "--dim", "16", "--rows", "256", "2048", "--steps", "2")
    assert "host memcpy:" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("256", "2,048"))]
    assert [(r[0], r[1]) for r in rows] == [("256", "sync"), ("256", "prefetch"), ("2,048", "sync"), ("2,048", "prefetch")]
    assert all(float(r[2]) > 0 and float(r[4]) >= 0 and r[5].endswith("%") for r in rows)  # ms, GB/s, share


def test_bench_scaling_prints_ratios_to_the_smallest_table(tmp_path):
    out = _tool("tools/bench_scaling.py", "--labels", "1e3", "1e4", "--encoder", "tiny-random", "--steps", "2",
                "--batch", "16", "--negatives", "8", "--data-root", str(tmp_path))
    rows = [line.split("|") for line in out.splitlines() if line.strip().startswith(("1,000 ", "10,000 "))]
    assert len(rows) == 2
    assert [cell.split()[1] for cell in rows[0][1:]] == ["1.00", "1.00", "1.00"]  # classifier, whole, dense
    assert all(float(cell.split()[0]) > 0 for cell in rows[1][1:])
