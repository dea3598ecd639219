"""benchmarks/gpu_check.py itself, on CPU: `--quick` prints one complete table (and writes it to --out),
and a check that raises becomes a FAIL row with a one-line reason instead of ending the script."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_mode_prints_one_complete_table(tmp_path, capsys):
    gc = _gpu_check()
    out = tmp_path / "table.md"
    code = gc.main(["--quick", "--out", str(out), "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.count("| check | status | result | detail |") == 1
    assert out.read_text() in printed
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    checks = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in rows[1:]}
    for prefix in ("environment", "CUDA kernel tests, float32", "CUDA kernel tests, bf16",
                   "BiMamba CUDA vs torch path, float32", "BiMamba CUDA vs torch path, bf16",
                   "from-cache epoch", "muse vs muse-transformer, T=2", "extraction", "evaluation"):
        hits = [status for name, status in checks.items() if name.startswith(prefix)]
        assert hits, f"no row for {prefix!r} in:\n{printed}"
        assert "FAIL" not in hits, printed
    # on CPU the kernel rows say why they did not run
    assert "needs a CUDA device" in printed
    assert code == 0
    assert not any(p.name.startswith("gpu-check-") for p in tmp_path.iterdir())  # scratch removed


def test_a_failing_check_becomes_a_fail_row():
    gc = _gpu_check()
    table = gc.Table(time.monotonic() + 100)
    with table.row("boom") as cell:
        assert cell is not None
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line")
    with table.row("after") as cell:
        cell.update(result="ran")
    with table.row("late", needs_s=1e6) as cell:
        assert cell is None
    text = table.markdown("## t")
    assert "| boom | FAIL |  | RuntimeError: CUDA error: an illegal memory access; " in text
    assert "second line" not in text
    assert "| after | PASS | ran |" in text
    assert "| late | SKIP |" in text and "time budget" in text
