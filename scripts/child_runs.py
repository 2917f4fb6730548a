"""One child process per case, one JSON file for all: the driver loop of the GPU diagnosis scripts.

vLLM allows one engine per process, so scripts that compare engine formats (``fp8_parity.py``,
``diagnose_fp8_scales.py``) run each case as ``python -P <script> --child ...`` and read the line
``RESULT {json}`` it prints. A case that crashes is recorded with its stderr tail instead of
stopping the others.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


def main(script: str, description: str, stem: str, option: str, cases: list[str], default_steps: int,
         child: Callable[[str, str, int], dict]) -> int:
    """The command line both diagnosis scripts share: ``--<option> CASE...`` (from ``cases``),
    ``--steps``, ``--model-dir`` (a random Qwen2-0.5B checkpoint, built if missing), ``--out``; each
    case runs ``child(path, case, steps)`` in its own process (the hidden ``--child``)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument(f"--{option}", nargs="+", default=list(cases), choices=list(cases))
    ap.add_argument("--steps", type=int, default=default_steps)
    ap.add_argument("--model-dir", default=None, help="random Qwen2-0.5B checkpoint (built if missing)")
    ap.add_argument("--out", default=None, help=f"write {stem}_<date>.json here")
    ap.add_argument("--child", nargs=3, metavar=("PATH", option.rstrip("s").upper(), "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.child[1], int(args.child[2]))), flush=True)
        return 0
    from trainserve.random_model import random_qwen2

    path = random_qwen2("0.5b", args.model_dir or Path(tempfile.gettempdir()) / "trainserve-random-qwen2-0.5b")
    results = run_children(script, {case: [str(path), case, str(args.steps)] for case in getattr(args, option)})
    if args.out:
        write_results(args.out, stem, results)
    return 0
