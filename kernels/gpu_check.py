"""The one GPU check: python -m kernels.gpu_check --out DIR

On a CUDA machine (made for H100/H200; no network needed, < 8 minutes), from the repository root:
  1. runs the kernel tests on the GPU (tests/test_triton_*.py, tests/test_cuda_*.py, tests/test_ref_ops.py:
     bf16 and fp16 at real shapes against the float64 reference),
  2. runs `python -m kernels.bench all`,
  3. writes DIR/<device>-<date>.json with the device, date, commit, the test summary and every
     benchmark figure (the file to commit as kernels/results/<device>-<date>.json).
The commit is read from git, or from IVMINI_COMMIT when the tree has no .git.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

import torch


def run_tests(timeout):
    files = sorted(glob.glob("tests/test_triton_*.py") + glob.glob("tests/test_cuda_*.py")) + ["tests/test_ref_ops.py"]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    summary = next((line for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", line)), "")
    print(out[-6000:])
    return {"files": files, "returncode": proc.returncode, "summary": summary.strip("= "),
            "seconds": round(time.time() - t0, 1), "output_tail": out[-20000:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the JSON result")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--test-timeout", type=int, default=300)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device; on CPU run `python -m pytest tests -q` and `python -m kernels.bench`")
    os.makedirs(args.out, exist_ok=True)
    from kernels import bench
    env = bench.environment()
    print(f"gpu_check on {env['device']}, commit {env['commit']}", flush=True)
    tests = {"skipped": True} if args.skip_tests else run_tests(args.test_timeout)
    t0 = time.time()
    ceil = bench.ceilings()
    results = {name: [] for name in bench.OPS}
    for name, fn in bench.OPS.items():
        fn(results[name])
    bench.annotate(results, ceil)
    bench.print_table(results, ceil)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    path = os.path.join(args.out, f"{slug}-{env['date']}.json")
    with open(path, "w") as f:
        json.dump({**env, "tests": tests, "bench_seconds": round(time.time() - t0, 1), "ceilings": ceil,
                   "results": results}, f, indent=1)
    print(f"\nwrote {path}; tests: {tests.get('summary', 'skipped')}")
    if tests.get("returncode"):
        sys.exit(1)


if __name__ == "__main__":
    main()
