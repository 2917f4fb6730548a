"""One child process per case, one JSON file for all: the driver loop of the GPU diagnosis scripts.

vLLM allows one engine per process, so scripts that compare engine formats (``fp8_parity.py``,
``diagnose_fp8_scales.py``) run each case as ``python -P <script> --child ...`` and read the line
``RESULT {json}`` it prints. A case that crashes is recorded with its stderr tail instead of
stopping the others.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path


def run_children(script: str, cases: dict[str, list[str]], timeout: float = 600) -> dict[str, dict]:
    """``{case: result}`` from ``script --child *argv`` per case (argv from ``cases``), printed as they finish."""
    results = {}
    for case, argv in cases.items():
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-P", script, "--child", *argv],
                              capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        results[case] = json.loads(lines[-1][len("RESULT "):]) if lines else {"error": proc.stderr[-3000:]}
        results[case]["wall_s"] = round(time.time() - t0, 1)
        print(case, json.dumps(results[case]), flush=True)
    return results


def write_results(out_dir: str, stem: str, results: dict) -> Path:
    """``<out_dir>/<stem>_<date>.json`` with the date, device and command beside the results."""
    import torch

    today = dt.date.today().isoformat()
    out = Path(out_dir) / f"{stem}_{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out.write_text(json.dumps({"date": today, "device": device, "command": " ".join(sys.argv),
                               "results": results}, indent=1))
    return out
