"""`make gpu-check`: on a CUDA machine, check the kernel paths and time the fusion heads (< 8 minutes).

    python benchmarks/gpu_check.py

1. prints the card, torch / CUDA versions and whether mamba_ssm / causal_conv1d are importable;
2. runs tests/test_cuda_kernels.py (kernel == torch path, forward and gradients; skipped without kernels);
3. times the selective scan on the GPU (benchmarks/scan.py --device cuda);
4. runs benchmarks/fusion.py --device cuda (muse vs muse-transformer, D=512, B=8, T = 4..64).
Ends with one markdown summary table. Each step has its own timeout so the whole stays under 8 min.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(name: str, cmd: list[str], timeout: float) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        status = f"timeout > {timeout:g}s"
    print(f"\n## {name}: {status}\n\n{out.strip()}\n", flush=True)
    return status, out, time.perf_counter() - t0


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device; torch.cuda.is_available() is False")
        return 2
    card = torch.cuda.get_device_name(0)
    cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
    kernels = ", ".join(f"{m}={'yes' if importlib.util.find_spec(m) else 'no'}" for m in ("mamba_ssm", "causal_conv1d"))
    print(f"# gpu-check\n\ncard: {card} (sm {cap}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"kernels: {kernels}")
    py = sys.executable
    steps = [
        ("CUDA kernel tests", [py, "-m", "pytest", "tests/test_cuda_kernels.py", "-q", "-rs"], 180),
        ("scan benchmark", [py, "benchmarks/scan.py", "--device", "cuda", "--configs",
                            "8x512x16x3060:306,8x512x16x16320:306"], 90),
        ("fusion benchmark", [py, "benchmarks/fusion.py", "--device", "cuda", "--repeats", "3", "--timeout", "60"], 200),
    ]
    rows = []
    for name, cmd, timeout in steps:
        status, out, secs = run(name, cmd, timeout)
        detail = ""
        if name == "CUDA kernel tests":
            m = re.findall(r"\d+ (?:passed|failed|skipped|error)", out)
            detail = ", ".join(m)
        elif name == "fusion benchmark":
            detail = "; ".join(line.strip() for line in out.splitlines() if line.startswith("crossover"))
        rows.append((name, status, f"{secs:.0f}", detail))
    print(f"\n## summary ({card})\n\n| check | status | seconds | detail |\n| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
