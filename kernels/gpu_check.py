"""The one GPU check: python -m kernels.gpu_check --out DIR

On a CUDA machine (made for H100/H200; no network needed, < 8 minutes), from the repository root:
  1. builds the CUDA extension (csrc/, `python -m kernels.cuda build`, for this GPU's architecture
     unless IVMINI_CUDA_ARCH says otherwise) and, where compute-sanitizer exists, runs its memcheck and
     racecheck tools on `python -m kernels.cuda selftest` (one small case of every CUDA kernel),
  2. runs the kernel tests on the GPU (tests/test_<op>.py, tests/test_triton_*.py, tests/test_cuda_*.py,
     tests/test_ref_ops.py:
     bf16 and fp16 at real shapes against the float64 reference),
  3. runs `python -m kernels.bench all` (ref, torch, triton and cuda columns),
  4. writes DIR/<device>-<date>.json with the device, date, commit, the build and sanitizer results, the
     test summary and every benchmark figure (the file to commit as kernels/results/<device>-<date>.json).
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


def build_cuda():
    """Build csrc/ for this GPU (cached by source hash). Returns the record for the JSON."""
    from kernels.cuda import build as cuda
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("IVMINI_CUDA_ARCH", f"{major}{minor}{'a' if major >= 9 else ''}")
    t0 = time.time()
    try:
        so = cuda.build()
        cuda.ext()
    except Exception as e:  # reported in the JSON; the tests and the bench then show the cuda column as n/a
        print(f"CUDA extension build failed: {e}")
        return {"ok": False, "error": str(e)[-4000:], "seconds": round(time.time() - t0, 1)}
    return {"ok": True, "archs": os.environ["IVMINI_CUDA_ARCH"], "module": str(so), "seconds": round(time.time() - t0, 1)}


def run_sanitizer(timeout):
    """compute-sanitizer memcheck and racecheck on the CUDA selftest (small shapes)."""
    import shutil
    tool = shutil.which("compute-sanitizer") or next(iter(glob.glob("/usr/local/cuda*/bin/compute-sanitizer")), None)
    if not tool:
        return {"skipped": "compute-sanitizer not found"}
    out = {}
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")   # one allocation per tensor: out-of-bounds is caught
    for check in ("memcheck", "racecheck"):
        t0 = time.time()
        try:
            proc = subprocess.run([tool, "--tool", check, "--error-exitcode", "1", sys.executable, "-m",
                                   "kernels.cuda", "selftest"], capture_output=True, text=True, timeout=timeout, env=env)
            text = proc.stdout + proc.stderr
            summary = next((line for line in reversed(text.splitlines()) if "ERROR SUMMARY" in line
                            or "RACECHECK SUMMARY" in line), "")
            out[check] = {"returncode": proc.returncode, "summary": summary.strip("= "),
                          "seconds": round(time.time() - t0, 1), "output_tail": text[-3000:]}
        except subprocess.TimeoutExpired:
            out[check] = {"returncode": None, "summary": f"timed out after {timeout} s"}
        print(f"compute-sanitizer {check}: {out[check]['summary']}", flush=True)
    return out


def run_tests(timeout):
    files = [f"tests/test_{op}.py" for op in ("attention", "rms_norm", "attn_pool", "masked_gather")] + sorted(
        glob.glob("tests/test_triton_*.py") + glob.glob("tests/test_cuda_*.py")) + ["tests/test_ref_ops.py"]
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
    ap.add_argument("--sanitizer-timeout", type=int, default=120)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device; on CPU run `python -m pytest tests -q` and `python -m kernels.bench`")
    os.makedirs(args.out, exist_ok=True)
    from kernels import bench
    env = bench.environment()
    print(f"gpu_check on {env['device']}, commit {env['commit']}", flush=True)
    cuda_build = build_cuda()
    sanitizer = run_sanitizer(args.sanitizer_timeout) if cuda_build["ok"] and not args.skip_tests else {"skipped": True}
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
        json.dump({**env, "cuda_build": cuda_build, "sanitizer": sanitizer, "tests": tests,
                   "bench_seconds": round(time.time() - t0, 1), "ceilings": ceil, "results": results}, f, indent=1)
    print(f"\nwrote {path}; tests: {tests.get('summary', 'skipped')}")
    if tests.get("returncode"):
        sys.exit(1)


if __name__ == "__main__":
    main()
