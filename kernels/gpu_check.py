"""The one GPU check: python -m kernels.gpu_check --out DIR [--budget SECONDS] [--copy-to DIR2] [--dry-run]

A lent GPU is a matter of minutes (here: 15 minutes of device time a session, at most 10 a command), so this
check spends a fixed budget (default 480 s: a 10-minute command always ends with results) on phases in the
order of what their results are worth, and keeps every result it gets:

  phase      what                                                         expected on an H100   share of 480
  build      csrc/ for this GPU's architecture (python -m kernels.cuda build)             30 s           60 s
  bench      a parallel warm-up of Triton's cache, then python -m kernels.bench <op>
             --pad88 for rms_norm, masked_gather, attn_pool, attention (cheap first)     160 s          170 s
  selftest   python -m kernels.cuda selftest: a small fp16 / bf16 case of every kernel    10 s           20 s
  tests      the per-op tests on the GPU (tests/test_<op>.py, selection below)          120 s          130 s
  memcheck   compute-sanitizer memcheck, only the project's kernels: the CUDA selftest
             and small Triton tests                                                      60 s           60 s
  racecheck  compute-sanitizer racecheck on the CUDA selftest, with the time left         45 s           40 s

Each phase runs subprocesses, each in its own process group, under a timeout: the phase's share of the budget
left, left * share / (the shares of this and the later phases). A phase quicker than its share passes the time
on; one that hangs costs only its share (the build's share is twice its expected time: without it there is no
cuda column). A timeout, a crash, or an error in gpu_check's own code in one phase is recorded and the next
phase runs; nothing is raised through main(). The JSON is rewritten atomically (tmp + os.replace) when a phase
starts and ends and after every benchmarked op, and each kernels.bench process rewrites its own part file after
every row: a killed run keeps what it measured. Every subprocess's output goes to one log beside the JSON.

The expected times, with the arithmetic. Offline compile times on the 2-core CPU machine (Triton 3.9, sm_90;
an H100 host core is taken as no slower), per kernel and config: attention bf16 ~1.2 s (forward with a bias
~3 s), fp32 (ieee dots, no tensor cores) 2.5 s at d = 64, 5 s at 88, 9 s at 128, 20-30 s at 256; attn_pool,
rms_norm, masked_gather 0.2-0.6 s. nvcc 13 for sm_90a: ~25 s for attention.cu, the longest file.
  build     ~25 s of nvcc (ninja compiles the other files beside it) + a process start = ~30 s.
  bench     warm-up: 7 attention specialisations (4 shapes, of which the two d = 88 ones share one, 2 bias
            shapes, the padded d = 88) x 13 configs (5 forward, 4 dK/dV, 4 dQ) = ~90 compiles x 1.5 s + ~30
            others x 0.5 s = ~150 CPU-s over 5 processes (one per config index: WARM_PROCESSES) = 30 s + 5 s
            of start-up. The timed runs then load cubins. A row costs ~0.2 s of do_bench (its estimate, 25 ms
            of warm-up, 100 ms of repeats, the L2 flush before each call), ~0.25 s more when re-timed from
            graphs; autotuning ~0.2 s per key and config; a process start 6 s (torch, CUDA, the ceilings):
            rms_norm 36 rows, 24 graphed = 16 + 6 = 22 s; masked_gather 24 rows + 8 host-sync checks = 15 + 6
            = 21 s; attn_pool 30 rows + 3 keys x 11 configs = 12 + 7 + 6 = 25 s; attention 92 rows + 8 keys x 13
            configs = 30 + 21 + 6 = 57 s. Total ~160 s.
  selftest  a process start (6 s) and ~10 small ops against float64 references.
  tests     ~330 tests after the selection; ~750 CPU-s of Triton compiles (fp32, one config: the 9 CASES ~155 s,
            the 14 head dims ~190 s, the rest ~160 s; bf16 autotuned: 9 CASES x 13 configs ~180 s; attn_pool
            ~40 s) over 10 pytest-xdist workers = ~75 s; float64 references at real shapes and worker starts
            ~45 s. The real shapes in bf16 were compiled and tuned by the bench. Total ~120 s.
  memcheck  two sanitized process starts (~15 s each) and ~40 small instrumented kernel runs.
  racecheck one sanitized selftest; racecheck tracks every shared-memory access.

The test selection (the pytest plugin at the end of this file, python -m pytest -p kernels.gpu_check
--gpu-check tests): the per-op test files on every backend (triton, cuda, torch), bf16 and fp32 (the fp16
duplicates of bf16 cases and the interpreter-only "upcast path" tests are left out), real shapes included; no
CUDA emulator, no nvcc build test, no compile-check test. Triton kernels autotune only for bf16 inputs
(InternVideo2's dtype: the configs the bench chose, kept by TRITON_CACHE_AUTOTUNING=1); fp32 and fp16 run one
config, the smallest tile, which fits in shared memory in fp32 up to d = 256 (213 KB of 227 KB for the forward).
Each test has a timeout (--test-timeout; faulthandler dumps the stacks and ends the process, pytest-xdist
replaces the worker). --gpu-check sanitizer: the small bf16 Triton cases of the per-op tests, one config each.

The JSON, DIR/<device>-<date>.json (e.g. kernels/results/nvidia-h100-80gb-hbm3-2026-12-07.json, the file to
commit; a dry run writes <device>-<date>-dry-run.json), the log DIR/<same stem>.log beside it:
  device, date, commit, torch, triton, python, dtype, cuda, capability, sms, memory_gib   the environment
  sources_sha256        16 hex digits over kernels/ and csrc/ (the copy on a device machine has no .git)
  budget_s, dry_run, started, elapsed_s, finished (false while running, or when the run was killed), log
  phases                {name: {status, share_s, planned_timeout_s, timeout_s, seconds, commands: [{cmd,
                        status, returncode, seconds}], reason | error}}, status one of planned, running, ok,
                        failed, timeout, error, skipped, killed; bench adds warm (its commands) and ops {op:
                        {status, seconds, rows}}, tests workers, selected, counts, failures, report (the
                        outcomes, one JSON line each), the sanitizers checks {program: {summary,
                        first_problems}}, selftest its lines
  ceilings, results     as kernels.bench writes them: {op: [rows]}, every figure with its timer
  summary               {phases: {name: status}, compass: [{target, anchor (or anchor_rule), unit, source,
                        measured {triton, cuda: value}, best_baseline, status measured | missing}]}: one entry
                        per target of ../shared/ref/kernel_anchors.md (_compass below)
The commit comes from git, else from IVMINI_COMMIT.

--dry-run (no GPU needed; tests/test_gpu_check.py): every phase is planned with its real commands and timeouts
and runs a stand-in (a sleeping process) that times out at once, so the JSON writes, the merge and the summary
run on a CPU machine; --dry-run-hold PHASE lets that phase's stand-in sleep through its share, to be killed.
"""
import argparse
import faulthandler
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = [f"tests/test_{op}.py" for op in ("attention", "rms_norm", "attn_pool", "masked_gather")]
# the bench's ops, cheap first, with their shares of the bench phase after the warm-up (expected: 22, 21, 25 and
# 57 s; the cheap ones get room to spare, what they leave goes to attention)
BENCH_OPS = {"rms_norm": 30, "masked_gather": 30, "attn_pool": 35, "attention": 65}
WARM_PROCESSES = 5           # the longest autotune list (the attention forward's) has 5 configs
WARM_SHARE = 0.35            # of the bench phase's time, at most, for the warm-up
MIN_PHASE_S = 10             # a phase with less time than this left is skipped
# the project's kernels, for compute-sanitizer's --kernel-name filter (a regex searched in the mangled name):
# CUDA's attention_fwd_kernel, rms_norm_bwd_kernel, ...; Triton's _attention_fwd_kernel, _rms_norm_fwd_kernel, ...
KERNEL_REGEX = "(attention|attn_pool|masked_gather|rms_norm)_[a-z_]*kernel"


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: the current phase's processes are stopped and the JSON is written."""


# ---------------------------------------------------------------------------------------------
# running commands

class Check:
    """One run: the JSON record, where it is written, the log, the budget."""

    def __init__(self, out, budget, dry_run, copy_to=None, hold=None, test_timeout=150):
        from kernels import bench     # its environment(); importing it sets TRITON_CACHE_AUTOTUNING for the children
        self.t0 = time.monotonic()
        self.budget, self.dry_run, self.copy_to, self.hold = budget, dry_run, copy_to, hold
        self.test_timeout = test_timeout
        env = bench.environment()
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        self.stem = Path(out) / f"{slug}-{env['date']}{'-dry-run' if dry_run else ''}"
        self.path, self.log = self.stem.with_suffix(".json"), self.stem.with_suffix(".log")
        self.record = {**env, "sources_sha256": sources_sha256(), "budget_s": budget, "dry_run": dry_run,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "elapsed_s": 0.0, "finished": False,
                       "log": self.log.name, "phases": {}, "ceilings": {}, "results": {}, "summary": {}}

    def remaining(self):
        return self.budget - (time.monotonic() - self.t0)

    def cuda_built(self):
        """Whether the build phase succeeded (a dry run plans the later phases as if it had)."""
        return self.dry_run or self.record["phases"]["build"]["status"] == "ok"

    def write(self):
        """The JSON, atomically (tmp + os.replace): a reader finds the previous complete file or this one."""
        self.record["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        write_json(self.path, self.record)
        if self.copy_to:
            write_json(Path(self.copy_to) / self.path.name, self.record)
            if self.log.exists():
                shutil.copyfile(self.log, Path(self.copy_to) / self.log.name)

    def say(self, text):
        print(text, flush=True)
        with open(self.log, "a") as f:
            f.write(f"\n=== {text}\n")

    def run(self, cmd, timeout, env=None, phase=None):
        """Run cmd (its output appended to the log) in its own process group; at the timeout the group gets
        SIGTERM, then SIGKILL. Returns {cmd, status ok | failed | timeout, returncode, seconds}. A dry run
        records cmd and runs a sleeping stand-in that times out at once (or, for the held phase, at its
        timeout)."""
        cmd = [str(c) for c in cmd]
        res = {"cmd": cmd}
        self.say(f"{' '.join(cmd)}   (timeout {timeout:.0f} s{'; dry run: a stand-in' if self.dry_run else ''})")
        if self.dry_run:
            cmd = [sys.executable, "-c", "import time; time.sleep(3600)"]
            timeout = timeout if phase == self.hold else 0.05
        t0 = time.monotonic()
        with open(self.log, "a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                    preexec_fn=os.setpgrp)   # own group: a timeout stops its children too
            if phase:
                self.record["phases"][phase]["pid"] = proc.pid   # to find (or kill) a running phase from outside
                self.write()
            try:
                proc.wait(timeout=max(timeout, 0.01))
                res.update(status="ok" if proc.returncode == 0 else "failed", returncode=proc.returncode)
            except subprocess.TimeoutExpired:
                res.update(status="timeout", returncode=None)
            finally:
                stop(proc)
        res["seconds"] = round(time.monotonic() - t0, 1)
        return res

    def run_parallel(self, cmds, timeout, env=None, phase=None):
        """Several commands at once (each its own process group), one deadline for all."""
        procs, results = [], []
        with open(self.log, "a") as log:
            for cmd in cmds:
                cmd = [str(c) for c in cmd]
                res = {"cmd": cmd}
                if self.dry_run:
                    cmd = [sys.executable, "-c", "import time; time.sleep(3600)"]
                self.say(f"{' '.join(res['cmd'])}   (in parallel, timeout {timeout:.0f} s)")
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                              preexec_fn=os.setpgrp))
                results.append(res)
        if phase:
            self.record["phases"][phase]["pid"] = procs[0].pid
            self.write()
        t0 = time.monotonic()
        deadline = t0 + (timeout if not self.dry_run or phase == self.hold else 0.05)
        try:
            for proc, res in zip(procs, results):
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
                    res.update(status="ok" if proc.returncode == 0 else "failed", returncode=proc.returncode)
                except subprocess.TimeoutExpired:
                    res.update(status="timeout", returncode=None)
                res["seconds"] = round(time.monotonic() - t0, 1)
        finally:
            for proc in procs:
                stop(proc)
        return results


def stop(proc):
    """End proc's process group (proc and everything it started): SIGTERM, 5 s, SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:      # the group is gone: nothing left to stop
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break


def write_json(path, payload):
    tmp = Path(f"{path}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def sources_sha256():
    """16 hex digits of sha256 over kernels/**/*.py and csrc/* (names and contents)."""
    h = hashlib.sha256()
    files = sorted(ROOT.glob("kernels/**/*.py")) + sorted(p for p in (ROOT / "csrc").glob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cuda_arch():
    """This GPU's architecture for nvcc: '90a' on an H100/H200 (the 'a' features: wgmma), '80' on an A100."""
    if not torch.cuda.is_available():
        return "90a"          # a dry run plans the H100 build
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}{'a' if major >= 9 else ''}"


def sanitizer():
    """compute-sanitizer's path (PATH, else the newest /usr/local/cuda*/bin), or None."""
    return shutil.which("compute-sanitizer") or max(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"), default=None)


def py(*args):
    return [sys.executable, *args]


# ---------------------------------------------------------------------------------------------
# the phases: each takes (check, its record, timeout) and fills the record; the status is set by main()
# from the commands' statuses unless the phase sets it

def phase_build(check, rec, timeout):
    res = check.run(py("-m", "kernels.cuda", "build", "--arch", os.environ["IVMINI_CUDA_ARCH"]), timeout,
                    phase="build")
    rec["commands"].append(res)
    rec["arch"] = os.environ["IVMINI_CUDA_ARCH"]


def phase_bench(check, rec, timeout):
    """The warm-up (Triton's cache filled by 5 processes, one autotune config index each), then one
    kernels.bench process per op, cheap ops first; each op's rows merged into the JSON as soon as it ends."""
    t_end = time.monotonic() + timeout
    skip = [] if check.cuda_built() else ["--skip-impl", "cuda"]
    warm = [py("-m", "kernels.bench", "all", "--pad88", "--warm-cache", str(k), *skip) for k in range(WARM_PROCESSES)]
    rec["warm"] = check.run_parallel(warm, WARM_SHARE * timeout, phase="bench")
    rec["ops"] = {}
    for i, op in enumerate(BENCH_OPS):
        left = t_end - time.monotonic()
        share = left * BENCH_OPS[op] / sum(list(BENCH_OPS.values())[i:])
        part = check.stem.parent / f"{check.stem.name}.bench-{op}.json"
        res = check.run(py("-m", "kernels.bench", op, "--pad88", "--json", part, *skip), share, phase="bench")
        rec["commands"].append(res)
        rec["ops"][op] = {"status": res["status"], "seconds": res["seconds"], "rows": 0}
        if part.exists():   # complete or not: the rows measured before a crash or a timeout count
            with open(part) as f:
                got = json.load(f)
            check.record["results"][op] = got["results"].get(op, [])
            check.record["ceilings"] = check.record["ceilings"] or got["ceilings"]
            rec["ops"][op]["rows"] = len(check.record["results"][op])
            if got.get("op_errors", {}).get(op):
                rec["ops"][op]["error"] = got["op_errors"][op]
            part.unlink()
        check.write()
    rec["status"] = worst(r["status"] for r in rec["ops"].values())


def phase_selftest(check, rec, timeout):
    if not check.cuda_built():
        rec.update(status="skipped", reason="the CUDA build did not succeed")
        return
    start = log_size(check)
    rec["commands"].append(check.run(py("-m", "kernels.cuda", "selftest"), timeout, phase="selftest"))
    text = log_tail(check, start)
    rec["lines"] = [ln.strip() for ln in text.splitlines() if "max rel error" in ln or ln.startswith("selftest:")]


def phase_tests(check, rec, timeout):
    workers = max(1, min(10, (os.cpu_count() or 2) - 4))   # compile in parallel, keep cores for the launches
    report = check.stem.parent / f"{check.stem.name}.tests.jsonl"
    report.unlink(missing_ok=True)
    cmd = py("-m", "pytest", "-p", "kernels.gpu_check", "--gpu-check", "tests", "--gpu-check-report", report,
             "--gpu-check-timeout", check.test_timeout, "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider")
    if importlib.util.find_spec("xdist") is None:
        rec["workers"] = "1 (pytest-xdist is not installed: the tests run one after another)"
    else:
        rec["workers"] = workers
        cmd += ["-n", str(workers)]
    if not check.cuda_built():
        cmd.append("--gpu-check-skip-cuda")
    rec["commands"].append(check.run(cmd + TEST_FILES, timeout, phase="tests"))
    rec.update(read_test_report(report))


def phase_memcheck(check, rec, timeout):
    tool = sanitizer()
    if tool is None and not check.dry_run:
        rec.update(status="skipped", reason="compute-sanitizer not found (PATH, /usr/local/cuda*/bin)")
        return
    tool = tool or "compute-sanitizer"
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")   # one allocation per tensor: overruns are seen
    base = [tool, "--tool", "memcheck", "--kernel-name", f"regex={KERNEL_REGEX}", "--error-exitcode", "1",
            "--print-limit", "20"]
    programs = []
    if check.cuda_built():
        programs.append(("cuda selftest", py("-m", "kernels.cuda", "selftest")))
    programs.append(("triton tests", py("-m", "pytest", "-p", "kernels.gpu_check", "--gpu-check", "sanitizer",
                                        "--gpu-check-timeout", 5 * check.test_timeout, "-q", "-x",
                                        "-p", "no:cacheprovider", *TEST_FILES)))
    end = time.monotonic() + timeout
    rec["checks"] = {}
    for i, (name, prog) in enumerate(programs):
        start = log_size(check)
        res = check.run(base + prog, (end - time.monotonic()) / (len(programs) - i), env=env, phase="memcheck")
        rec["commands"].append(res)
        rec["checks"][name] = sanitizer_summary(log_tail(check, start))


def phase_racecheck(check, rec, timeout):
    tool = sanitizer()
    if tool is None and not check.dry_run:
        rec.update(status="skipped", reason="compute-sanitizer not found (PATH, /usr/local/cuda*/bin)")
        return
    if not check.cuda_built():
        rec.update(status="skipped", reason="the CUDA build did not succeed")
        return
    start = log_size(check)
    rec["commands"].append(check.run([tool or "compute-sanitizer", "--tool", "racecheck", "--kernel-name",
                                      f"regex={KERNEL_REGEX}", "--error-exitcode", "1", "--print-limit", "20",
                                      *py("-m", "kernels.cuda", "selftest")], timeout, phase="racecheck"))
    rec["checks"] = {"cuda selftest": sanitizer_summary(log_tail(check, start))}


# name -> (the function, its share in seconds of a 480 s budget): the order is the run order. The shares are the
# expected times (module docstring) with room to spare where a timeout would lose the most for the least
# (the build: without it no cuda column).
PHASES = {"build": (phase_build, 60), "bench": (phase_bench, 170), "selftest": (phase_selftest, 20),
          "tests": (phase_tests, 130), "memcheck": (phase_memcheck, 60), "racecheck": (phase_racecheck, 40)}


def worst(statuses):
    order = ["ok", "skipped", "failed", "timeout", "error", "killed"]
    return max(statuses, key=order.index, default="ok")


def log_size(check):
    return check.log.stat().st_size if check.log.exists() else 0


def log_tail(check, start):
    with open(check.log, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


def sanitizer_summary(text):
    """compute-sanitizer's closing lines ("ERROR SUMMARY: 0 errors", "RACECHECK SUMMARY: ...") and its first
    reported problems."""
    lines = [ln.strip("= ").strip() for ln in text.splitlines() if ln.startswith("=========")]
    summary = [ln for ln in lines if "SUMMARY" in ln]
    problems = [ln for ln in lines if ln.startswith(("Invalid", "Error", "Race", "Program hit", "Warning"))]
    return {"summary": summary or ["no summary (the run did not finish)"], "first_problems": problems[:10]}


def read_test_report(path):
    """Counts and failures from the plugin's report (one JSON line per test outcome, written as they come)."""
    if not path.exists():
        return {"counts": {}, "failures": [], "selected": None}
    outcome, failures, selected = {}, [], None
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:    # the last line of a killed run may be cut
            continue
        if "selected" in r:
            selected = max(selected or 0, r["selected"])
            continue
        prev = outcome.get(r["nodeid"])
        if r["outcome"] == "failed" or prev is None or (prev == "passed" and r["outcome"] == "skipped"):
            outcome[r["nodeid"]] = r["outcome"]
        if r["outcome"] == "failed":
            failures.append({"test": r["nodeid"], "when": r["when"], "message": r.get("message", "")})
    counts = {k: sum(1 for v in outcome.values() if v == k) for k in ("passed", "failed", "skipped")}
    return {"selected": selected, "counts": counts, "failures": failures[:50], "report": path.name}


# ---------------------------------------------------------------------------------------------
# the summary: every compass figure of ../shared/ref/kernel_anchors.md, measured or missing

# (target, op, shape label, mode, anchor, unit, where the anchor comes from); "copy" anchors are the device-copy
# ceiling measured in the same run (x the factor); "bwd" is derived: (fwd+bwd work - fwd work) / (time difference)
def _compass():
    from kernels.bench import LABELS
    a, r, p, g = LABELS["attention"], LABELS["rms_norm"], LABELS["attn_pool"], LABELS["masked_gather"]
    return [
        ("attention 1B (d88, N2049) forward", "attention", a(8, 16, 2049, 88, False), "fwd", 600, "TFLOP/s",
         "3a [E]: ~600 useful TFLOP/s (FA3 hd128 level); FA3's hdim96 path est. 410-550 useful"),
        ("attention 1B (d88, N2049) backward", "attention", a(8, 16, 2049, 88, False), "bwd", 500, "TFLOP/s",
         "3a [E]: ~500 useful TFLOP/s"),
        ("attention 1B masked (d88, N417) forward", "attention", a(32, 16, 417, 88, False), "fwd", 467, "TFLOP/s",
         "3a: FA3 at N=512, d=128: 467 (no d=88 anchor exists)"),
        ("attention 1B masked (d88, N417) backward", "attention", a(32, 16, 417, 88, False), "bwd", 316, "TFLOP/s",
         "3a: FA3 at N=512, d=128: 316"),
        ("attention 6B (d128, N2049) forward", "attention", a(4, 25, 2049, 128, False), "fwd", 625, "TFLOP/s",
         "3a: FA3 625, cuDNN 617 (N=2k, d=128, H100 fp16)"),
        ("attention 6B (d128, N2049) backward", "attention", a(4, 25, 2049, 128, False), "bwd", 501, "TFLOP/s",
         "3a: FA3 501, cuDNN 465"),
        ("rms_norm 1B (B8 x 2049 rows, C1408) forward", "rms_norm", r(8 * 2049, 1408), "fwd", ("copy", 0.9), "GB/s",
         "3b [E]: >= 90% of the measured copy (2.7 TB/s on an H100)"),
        ("rms_norm 1B backward", "rms_norm", r(8 * 2049, 1408), "bwd", ("copy", 2500 / 3000), "GB/s",
         "3b [E]: >= 2.5 TB/s on an H100 (83% of its copy)"),
        ("rms_norm 6B (C3200) forward", "rms_norm", r(4 * 2049, 3200), "fwd", ("copy", 0.9), "GB/s",
         "3b [E]: >= 90% of the measured copy"),
        ("attn_pool 1B (B32, N2049) forward", "attn_pool", p(32, 2049, 1408, 16, 768), "fwd", ("copy", 1.0), "GB/s",
         "3c [E]: one read of x at the copy bandwidth (~62 us for 185 MB on an H100)"),
        ("attn_pool 1B (B32, N2049) backward", "attn_pool", p(32, 2049, 1408, 16, 768), "bwd", ("copy", 1.0), "GB/s",
         "3c [E]: one more read of x and one write of dx at the copy bandwidth"),
        ("masked_gather 1B (B32, 417 of 2049) forward", "masked_gather", g(32, 2049, 1408, 417), "fwd", ("copy", 1.0),
         "GB/s", "3c/4.6 [E]: memory-bound: the copy bandwidth"),
        ("masked_gather 1B backward", "masked_gather", g(32, 2049, 1408, 417), "bwd", ("copy", 1.0), "GB/s",
         "3c/4.6 [E]: memory-bound: the copy bandwidth"),
        ("masked_gather without a host sync", "masked_gather", g(32, 2049, 1408, 417), "host_sync", "none", "",
         "4.6: boolean-mask indexing syncs (nonzero); index gathers must not"),
        ("ceiling: bf16 8192^3 matmul", "ceilings", "matmul_tflops", "", 798, "TFLOP/s", "1: measured on a lent H100"),
        ("ceiling: 1 GiB device copy", "ceilings", "copy_gbps", "", 3000, "GB/s", "1: measured on a lent H100"),
    ]


def compass(record):
    """[{target, anchor, unit, source, measured {impl: value}, best_baseline, status}] for every compass figure."""
    out, ceil = [], record.get("ceilings") or {}
    for target, op, shape, mode, anchor, unit, source in _compass():
        entry = {"target": target, "unit": unit, "source": f"kernel_anchors.md {source}", "measured": {}}
        if isinstance(anchor, tuple):       # a fraction of the copy bandwidth measured in this run
            entry["anchor_rule"] = f"{anchor[1]:.2f} x copy"
            copy = ceil.get("copy_gbps")
            anchor = round(anchor[1] * copy, 1) if copy else None
        entry["anchor"] = anchor
        if op == "ceilings":
            if ceil.get(shape):
                entry["measured"]["device"] = round(ceil[shape], 1)
        else:
            rows = [r for r in record.get("results", {}).get(op, []) if r["shape"] == shape]
            for impl in ("triton", "cuda"):
                value = _figure(rows, impl, mode)
                if value is not None:
                    entry["measured"][impl] = value
            if mode != "host_sync":
                base = {r["impl"]: _figure(rows, r["impl"], mode) for r in rows if r["impl"].startswith(
                    ("sdpa_", "official_", "torch_"))}
                base = {k: v for k, v in base.items() if v is not None}
                if base:
                    best = max(base, key=base.get)
                    entry["best_baseline"] = {best: base[best]}
        entry["status"] = "measured" if entry["measured"] else "missing"
        out.append(entry)
    return out


def _figure(rows, impl, mode):
    """impl's figure in rows: the value of the fwd / fwd+bwd row, the backward derived from both, or host_sync."""
    by_mode = {r["mode"]: r for r in rows if r["impl"] == impl}
    if mode == "host_sync":
        return by_mode.get("host_sync", {}).get("host_sync")
    if mode != "bwd":
        return round(by_mode[mode]["value"], 1) if "value" in by_mode.get(mode, {}) else None
    f, fb = by_mode.get("fwd", {}), by_mode.get("fwd+bwd", {})
    if "value" not in f or "value" not in fb or fb["ms"] <= f["ms"]:
        return None
    return round((fb["value"] * fb["ms"] - f["value"] * f["ms"]) / (fb["ms"] - f["ms"]), 1)


def print_summary(record):
    print("\nphases:")
    for name, rec in record["phases"].items():
        extra = rec.get("reason") or rec.get("error", "")
        if name == "tests" and rec.get("counts"):
            extra = ", ".join(f"{v} {k}" for k, v in rec["counts"].items()) + f" (of {rec.get('selected')})"
        if "checks" in rec:
            extra = "; ".join(f"{k}: {', '.join(v['summary'])}" for k, v in rec["checks"].items())
        if rec.get("ops"):
            extra = ", ".join(f"{op} {o['status']} ({o['rows']} rows)" for op, o in rec["ops"].items())
        print(f"  {name:10s} {rec['status']:8s} {rec.get('seconds', 0):6.1f} s / {rec.get('timeout_s', 0):5.0f} s"
              f"  {extra[:110]}")
    for failure in record["phases"]["tests"].get("failures", [])[:10]:
        print(f"  failed: {failure['test']}")
    print("\ncompass (kernel_anchors.md):")
    for e in record["summary"].get("compass", []):
        got = ", ".join(f"{k} {v}" for k, v in e["measured"].items()) or "-"
        base = ", ".join(f"{k} {v}" for k, v in e.get("best_baseline", {}).items())
        anchor = f"{e['anchor']} {e['unit']}" if e["anchor"] is not None else e["anchor_rule"]
        print(f"  {e['status']:8s} {e['target']:44s} anchor {anchor:20s} measured: {got}"
              + (f" (best baseline: {base})" if base else ""))


# ---------------------------------------------------------------------------------------------
# main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the JSON and the log (kernels/results to commit)")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    ap.add_argument("--copy-to", help="also keep a copy of the JSON and the log here, updated with every write "
                                      "(e.g. \"$OUT\" on a device machine, where only $OUT comes back)")
    ap.add_argument("--test-timeout", type=int, default=150, help="seconds per test (default 150)")
    ap.add_argument("--dry-run", action="store_true", help="plan every phase and run stand-ins that time out at "
                                                           "once: the JSON logic without a GPU")
    ap.add_argument("--dry-run-hold", choices=list(PHASES), help="dry run: this phase's stand-in sleeps for its "
                                                                 "full share (to test a killed run)")
    args = ap.parse_args(argv)
    if args.copy_to == "":
        ap.error("--copy-to is empty (is $OUT set? it exists on the device machine only)")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device (--dry-run plans it without one); on CPU run `python -m pytest "
                 "tests -q` and `python -m kernels.bench`")
    os.makedirs(args.out, exist_ok=True)
    if args.copy_to:
        os.makedirs(args.copy_to, exist_ok=True)
    os.environ.setdefault("IVMINI_CUDA_ARCH", cuda_arch())   # the children build and load the same extension
    check = Check(args.out, args.budget, args.dry_run, args.copy_to, args.dry_run_hold, args.test_timeout)
    check.log.write_text("")
    check.say(f"gpu_check on {check.record['device']}, commit {check.record['commit']}, budget {args.budget:.0f} s"
              f"{' (dry run)' if args.dry_run else ''}; writing {check.path}")
    done, total = 0, sum(share for _, share in PHASES.values())
    for name, (_, share) in PHASES.items():
        # the timeout this phase gets when every earlier phase uses all of its share
        planned = (args.budget - 2 - done) * share / (total - done)
        check.record["phases"][name] = {"status": "planned", "share_s": share, "planned_timeout_s":
                                        round(planned, 1), "commands": []}
        print(f"  plan: {name:10s} timeout {planned:4.0f} s if the phases before use all of theirs")
        done += share
    check.write()

    def interrupted(signum, frame):
        raise Interrupted(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        run_phases(check)
    finally:
        signal.signal(signal.SIGTERM, previous)
    check.record["summary"] = {"phases": {n: r["status"] for n, r in check.record["phases"].items()},
                               "compass": compass(check.record)}
    check.record["finished"] = True
    check.write()
    print_summary(check.record)
    print(f"\nwrote {check.path} and {check.log}")
    return check.record


def run_phases(check):
    """Each phase in turn with its share of the budget left; whatever happens in one is recorded."""
    names = list(PHASES)
    for i, name in enumerate(names):
        fn, share = PHASES[name]
        rec = check.record["phases"][name]
        left = check.remaining() - 2                       # 2 s kept for the summary and the last write
        timeout = left * share / sum(PHASES[n][1] for n in names[i:])
        rec["timeout_s"] = round(timeout, 1)
        if timeout < MIN_PHASE_S:
            rec.update(status="skipped", reason=f"no time left ({max(left, 0):.0f} s of the budget)")
            check.write()
            continue
        rec["status"] = "running"
        check.write()
        t0 = time.monotonic()
        try:
            fn(check, rec, timeout)
        except (Interrupted, KeyboardInterrupt) as e:
            rec.update(status="killed", error=f"{type(e).__name__}: {e}")
            for rest in names[i + 1:]:
                check.record["phases"][rest].update(status="skipped", reason="the check was interrupted")
            break
        except Exception as e:       # gpu_check's own failure in this phase: recorded, the next phase runs
            rec.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        finally:
            rec["seconds"] = round(time.monotonic() - t0, 1)
            rec.pop("pid", None)
        if rec["status"] == "running":
            rec["status"] = worst(c["status"] for c in rec["commands"])
        check.write()
        check.say(f"{name}: {rec['status']} in {rec['seconds']} s")


# ---------------------------------------------------------------------------------------------
# the pytest plugin of the tests and memcheck phases: python -m pytest -p kernels.gpu_check --gpu-check tests ...

def pytest_addoption(parser):
    group = parser.getgroup("gpu_check", "kernels.gpu_check's test selection")
    group.addoption("--gpu-check", choices=["tests", "sanitizer"],
                    help="tests: the per-op tests on the GPU (fp16 duplicates and interpreter-only tests left out, "
                         "Triton autotuning for bf16 only); sanitizer: small Triton cases, one config each")
    group.addoption("--gpu-check-timeout", type=float, default=150, help="seconds per test (then the process exits)")
    group.addoption("--gpu-check-report", help="append one JSON line per test outcome here")
    group.addoption("--gpu-check-skip-cuda", action="store_true", help="leave the cuda backend out (its build failed)")


SANITIZER_TESTS = {"test_rms_norm_fwd_bwd", "test_masked_gather_fwd_bwd", "test_attn_pool_fwd_bwd",
                   "test_attention_half", "test_attention_bias"}


def smallest_config(configs):
    """The config with the smallest tile x stages (the least shared memory; ties: more warps, fewer registers
    per thread)."""
    return min(configs, key=lambda c: (math.prod(c.kwargs.values()) * c.num_stages, -c.num_warps))


def _bf16_only(configs, named_args, **kwargs):
    """early_config_prune: every config for bf16 inputs, the smallest alone otherwise."""
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in named_args.values()):
        return configs
    return [smallest_config(configs)]


def _then_bf16_only(prune):
    """The kernel's own early_config_prune (if it has one), then _bf16_only."""
    def both(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs) if prune else configs
        return _bf16_only(kept, named_args, **kwargs)
    return both


def pytest_configure(config):
    which = config.getoption("--gpu-check")
    if which is None:
        raise pytest.UsageError("-p kernels.gpu_check needs --gpu-check tests|sanitizer")
    _CONFIG[:] = [config]
    from kernels.bench import autotuners
    for tuner in autotuners():
        if which == "tests":
            tuner.early_config_prune = _then_bf16_only(tuner.early_config_prune)
        else:       # under a sanitizer every launch is slow: no autotuning at all
            tuner.configs = [smallest_config(tuner.configs)]


def _params(item):
    """The test's parameters ({} when it is not parametrised: then pytest gives it no callspec)."""
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec else {}


def _case(item):
    """What identifies item's case apart from its dtype parameter."""
    return item.originalname, tuple(sorted((k, str(v)) for k, v in _params(item).items() if k != "dtype"))


@pytest.hookimpl(trylast=True)     # after -k / -m deselection: the count is what runs
def pytest_collection_modifyitems(config, items):
    which = config.getoption("--gpu-check")
    bf16_cases = {_case(item) for item in items if _params(item).get("dtype") == torch.bfloat16}
    keep, drop = [], []
    for item in items:
        params, name = _params(item), item.originalname
        if which == "tests":
            fp16_duplicate = params.get("dtype") == torch.float16 and _case(item) in bf16_cases
            left_out = (fp16_duplicate or name.endswith("_upcast_path")
                        or (config.getoption("--gpu-check-skip-cuda")
                            and (params.get("backend") == "cuda" or "cuda" in name)))
        else:
            left_out = (name not in SANITIZER_TESTS or params.get("backend") != "triton"
                        or params.get("dtype", torch.bfloat16) != torch.bfloat16)
        (drop if left_out else keep).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
    _report(config, {"selected": len(keep), "deselected": len(drop)},
            only_first_worker=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A hung test (a kernel that never ends, a deadlock) ends its process with a traceback after the timeout;
    under pytest-xdist the worker is replaced and the run goes on."""
    faulthandler.dump_traceback_later(item.config.getoption("--gpu-check-timeout"), exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()    # the workers share one GPU: none keeps its last test's peak cached


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                "seconds": round(report.duration, 2)}
        if report.outcome == "failed":
            line["message"] = str(report.longrepr)[-1500:]
        _report(_CONFIG[0], line)


_CONFIG = []      # the pytest config, for the report hook (pytest_runtest_logreport gets only the report)


def _report(config, line, only_first_worker=False):
    """Append line to --gpu-check-report: from the process that sees every outcome (pytest-xdist's controller, or
    the only process); the collection line from one process that collected."""
    path = config.getoption("--gpu-check-report")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if path is None or (worker is not None and not (only_first_worker and worker == "gw0")):
        return
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
