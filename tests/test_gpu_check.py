"""kernels.gpu_check without a GPU (its --dry-run: every phase planned, stand-ins that time out at once) and
kernels.bench's JSON on CPU: the JSON is rewritten complete after every phase, a run killed mid-phase leaves
the earlier phases' results on disk, a phase that raises or times out is recorded and the later phases still
run; the compass summary, the test report parser and the pytest plugin's test selection. ~10 s on 2 cores."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import triton

from kernels import bench, gpu_check

ROOT = Path(__file__).resolve().parents[1]
PHASES = list(gpu_check.PHASES)


@pytest.fixture
def snapshots(monkeypatch):
    """Every JSON gpu_check writes to its --out folder, read back from disk right after the write (so each must
    be a complete file)."""
    seen = []
    write = gpu_check.write_json

    def spy(path, payload):
        write(path, payload)
        if Path(path).parent.name != "copy":
            seen.append(json.loads(Path(path).read_text()))
    monkeypatch.setattr(gpu_check, "write_json", spy)
    monkeypatch.setenv("IVMINI_CUDA_ARCH", "90a")
    return seen


def test_dry_run_writes_the_json_after_every_phase(tmp_path, snapshots):
    record = gpu_check.main(["--out", str(tmp_path / "out"), "--dry-run", "--copy-to", str(tmp_path / "copy")])
    path = tmp_path / "out" / f"cpu-{record['date']}-dry-run.json"
    assert json.loads(path.read_text()) == record == json.loads((tmp_path / "copy" / path.name).read_text())
    assert (tmp_path / "out" / path.with_suffix(".log").name).exists()
    assert not list((tmp_path / "out").glob("*.tmp*")) and not list((tmp_path / "out").glob("*.bench-*.json"))
    # each phase was written running and then done, in order; every stand-in timed out
    for i, name in enumerate(PHASES):
        states = [s["phases"][name]["status"] for s in snapshots]
        first_running = states.index("running")
        assert set(states[:first_running]) == {"planned"}
        assert states[-1] == "timeout", (name, states[-1])
        assert all(s["phases"][p]["status"] not in ("planned", "running") for p in PHASES[:i]
                   for s in snapshots[first_running:])
        assert record["phases"][name]["commands"], name
    assert [s["finished"] for s in snapshots].count(True) == 1 and snapshots[-1]["finished"]
    build = record["phases"]["build"]["commands"][0]["cmd"]
    assert build[-4:] == ["kernels.cuda", "build", "--arch", "90a"]
    bench_phase = record["phases"]["bench"]
    assert len(bench_phase["warm"]) == gpu_check.WARM_PROCESSES
    assert list(bench_phase["ops"]) == ["rms_norm", "masked_gather", "attn_pool", "attention"]
    assert all(op["status"] == "timeout" and op["rows"] == 0 for op in bench_phase["ops"].values())
    assert "--pad88" in bench_phase["commands"][-1]["cmd"]
    tests = record["phases"]["tests"]["commands"][0]["cmd"]
    assert tests[-4:] == gpu_check.TEST_FILES and "kernels.gpu_check" in tests
    memcheck = [c["cmd"] for c in record["phases"]["memcheck"]["commands"]]
    assert all(f"regex={gpu_check.KERNEL_REGEX}" in c for c in memcheck) and len(memcheck) == 2
    # the summary names every compass figure, none measured
    compass = record["summary"]["compass"]
    assert len(compass) == len(gpu_check._compass()) and {e["status"] for e in compass} == {"missing"}
    assert record["summary"]["phases"] == {p: "timeout" for p in PHASES}


def test_a_phase_that_raises_is_recorded_and_the_next_phases_run(tmp_path, snapshots, monkeypatch):
    def broken(check, rec, timeout):
        raise RuntimeError("selftest parser broke")
    monkeypatch.setitem(gpu_check.PHASES, "selftest", (broken, gpu_check.PHASES["selftest"][1]))
    record = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--budget", "300"])
    selftest = record["phases"]["selftest"]
    assert selftest["status"] == "error" and "selftest parser broke" in selftest["error"]
    assert "Traceback" in selftest["traceback"]
    assert [record["phases"][p]["status"] for p in ("tests", "memcheck", "racecheck")] == ["timeout"] * 3
    assert record["finished"]


def test_a_phase_without_time_left_is_skipped(tmp_path, snapshots):
    record = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--budget", "30"])
    statuses = record["summary"]["phases"]
    assert statuses["build"] == "skipped" and "no time left" in record["phases"]["build"]["reason"]
    assert statuses["bench"] == "timeout"        # the largest share is still over the 10 s minimum


def test_a_killed_run_keeps_the_earlier_phases_results(tmp_path):
    """SIGKILL during the tests phase (its stand-in sleeps): the JSON on disk is complete, has the earlier
    phases done and shows the tests phase running."""
    env = dict(os.environ, IVMINI_CUDA_ARCH="90a")
    proc = subprocess.Popen([sys.executable, "-m", "kernels.gpu_check", "--out", str(tmp_path), "--dry-run",
                             "--dry-run-hold", "tests"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    record, deadline = None, time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            files = list(tmp_path.glob("*-dry-run.json"))
            if files:
                record = json.loads(files[0].read_text())
                if "pid" in record["phases"]["tests"]:
                    break
            time.sleep(0.1)
        proc.kill()
        proc.wait()
    finally:
        if record and "pid" in record["phases"]["tests"]:
            os.killpg(record["phases"]["tests"]["pid"], signal.SIGKILL)    # the stand-in's own process group
    assert record is not None and "pid" in record["phases"]["tests"], "the tests phase never started"
    on_disk = json.loads(files[0].read_text())
    assert on_disk["finished"] is False
    assert [on_disk["phases"][p]["status"] for p in PHASES] == \
        ["timeout", "timeout", "timeout", "running", "planned", "planned"]
    assert on_disk["phases"]["bench"]["ops"]["attention"]["status"] == "timeout"
    assert on_disk["phases"]["tests"]["timeout_s"] > 100


def test_compass_reads_the_bench_rows():
    label = bench.LABELS["attention"](8, 16, 2049, 88, False)
    rows = [{"shape": label, "mode": "fwd", "impl": "triton", "ms": 1.0, "value": 400.0},
            {"shape": label, "mode": "fwd+bwd", "impl": "triton", "ms": 4.0, "value": 350.0},
            {"shape": label, "mode": "fwd", "impl": "sdpa_flash", "ms": 1.2, "value": 333.3},
            {"shape": label, "mode": "fwd", "impl": "cuda", "error": "RuntimeError: boom"}]
    gather = bench.LABELS["masked_gather"](32, 2049, 1408, 417)
    rows_g = [{"shape": gather, "mode": "host_sync", "impl": "triton", "host_sync": "none"},
              {"shape": gather, "mode": "fwd", "impl": "cuda", "ms": 0.1, "value": 2500.0}]
    record = {"ceilings": {"matmul_tflops": 790.0, "copy_gbps": 3000.0},
              "results": {"attention": rows, "masked_gather": rows_g}}
    entries = {e["target"]: e for e in gpu_check.compass(record)}
    fwd, bwd = entries["attention 1B (d88, N2049) forward"], entries["attention 1B (d88, N2049) backward"]
    assert fwd["measured"] == {"triton": 400.0} and fwd["best_baseline"] == {"sdpa_flash": 333.3}
    assert fwd["status"] == "measured" and fwd["anchor"] == 600
    assert bwd["measured"] == {"triton": round((350 * 4 - 400 * 1) / 3, 1)}    # backward alone: 333.3
    assert entries["masked_gather 1B (B32, 417 of 2049) forward"]["measured"] == {"cuda": 2500.0}
    assert entries["masked_gather 1B (B32, 417 of 2049) forward"]["anchor"] == 3000.0
    assert entries["masked_gather without a host sync"]["measured"] == {"triton": "none"}
    assert entries["rms_norm 1B (B8 x 2049 rows, C1408) forward"]["anchor"] == 2700.0
    assert entries["rms_norm 1B (B8 x 2049 rows, C1408) forward"]["status"] == "missing"
    assert entries["ceiling: 1 GiB device copy"]["measured"] == {"device": 3000.0}


def test_every_compass_shape_is_a_benchmarked_shape():
    labels = {op: {bench.LABELS[op](*s) for s in shapes["gpu"]} for op, shapes in bench.SHAPES.items()}
    for target, op, shape, *_ in gpu_check._compass():
        if op != "ceilings":
            assert shape in labels[op], target


def test_read_test_report(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [{"selected": 5}, {"selected": 5},
             {"nodeid": "a", "when": "call", "outcome": "passed"},
             {"nodeid": "a", "when": "teardown", "outcome": "failed", "message": "leak"},
             {"nodeid": "b", "when": "setup", "outcome": "skipped"},
             {"nodeid": "c", "when": "call", "outcome": "passed"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"nodeid": "d", "wh')   # cut by a kill
    got = gpu_check.read_test_report(path)
    assert got["selected"] == 5 and got["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert got["failures"] == [{"test": "a", "when": "teardown", "message": "leak"}]


def test_smallest_config_and_bf16_only_autotuning():
    configs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
               triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
               triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
               triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
               triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=2)]
    assert gpu_check.smallest_config(configs) is configs[4]
    bf16, fp32 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    assert gpu_check._bf16_only(configs, {"Q": bf16, "LSE": fp32, "N": 3}) == configs
    assert gpu_check._bf16_only(configs, {"Q": fp32, "LSE": fp32, "N": 3}) == [configs[4]]


def test_plugin_selection():
    """--gpu-check tests leaves out the fp16 duplicates and interpreter-only tests (and cuda when asked);
    --gpu-check sanitizer keeps small Triton cases only."""
    def collect(*args):
        out = subprocess.run([sys.executable, "-m", "pytest", "-p", "kernels.gpu_check", *args, "--collect-only",
                              "-q", "-p", "no:cacheprovider", *gpu_check.TEST_FILES], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        return [ln for ln in out.splitlines() if "::" in ln]
    every = collect("--gpu-check", "tests")
    assert every and not [t for t in every if "upcast_path" in t]
    half = [t for t in every if t.startswith("tests/test_attention.py::test_attention_half[")]
    assert half and all("-dtype1-" in t for t in half)       # dtype0 = fp16 is left out, dtype1 = bf16 stays
    assert "tests/test_rms_norm.py::test_rms_norm_strided_rows[dtype1-1411-3-1408-triton]" in every  # fp16, no twin
    assert any("-cuda]" in t for t in every)
    no_cuda = collect("--gpu-check", "tests", "--gpu-check-skip-cuda")
    assert no_cuda and not [t for t in no_cuda if "cuda" in t] and set(no_cuda) < set(every)
    sanitized = collect("--gpu-check", "sanitizer")
    assert sanitized and all(t.endswith("-triton]") for t in sanitized)
    assert {t.split("::")[1].split("[")[0] for t in sanitized} <= gpu_check.SANITIZER_TESTS


def test_bench_writes_its_json_after_every_row(tmp_path, monkeypatch):
    """kernels.bench on CPU (the interpreter): a complete JSON after each row, skipped and failing rows
    recorded, every row timed on the wall clock."""
    seen = []
    write = bench.write_json

    def spy(path, payload):
        write(path, payload)
        seen.append(json.loads(Path(path).read_text()))
    monkeypatch.setattr(bench, "write_json", spy)
    for name in ("SKIP", "ROW_DONE", "PAD88", "WARM"):      # main() sets these module globals: undone after
        monkeypatch.setattr(bench, name, getattr(bench, name))
    out = tmp_path / "bench.json"
    results = bench.main(["masked_gather", "--json", str(out), "--skip-impl", "torch"])
    rows = results["masked_gather"]
    counts = [len(s["results"]["masked_gather"]) for s in seen]
    assert counts[:len(rows)] == list(range(1, len(rows) + 1)) and counts[-1] == len(rows)
    by_impl = {(r["impl"], r["mode"]): r for r in rows}
    assert by_impl[("torch", "fwd")]["error"] == "skipped (--skip-impl torch)"
    assert "needs CUDA tensors" in by_impl[("cuda", "fwd+bwd")]["error"]
    for impl in ("triton", "official_bool_index", "ref"):
        for mode in ("fwd", "fwd+bwd"):
            assert by_impl[(impl, mode)]["timer"] == "wall" and by_impl[(impl, mode)]["ms"] > 0
    assert [r["impl"] for r in rows[::2]] == ["triton", "cuda", "torch", "official_bool_index", "ref"]
    assert json.loads(out.read_text())["results"]["masked_gather"] == rows
