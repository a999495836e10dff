"""The Triton kernels compile for the GPU with the real compiler and the JIT's argument specialisation, no GPU needed
(kernels/compile_check.py): the interpreter that runs the numerical tests on CPU checks neither tl.dot shape
minimums nor register or shared-memory limits. And the attention tiles stay what the GPU should run: at head dim 88
in the ViT's layout, every autotune config of every attention kernel loads Q/K/V/dO and stores O/dQ/dK/dV as
16-byte vectors (cp.async in the pipelined loops, no 2-byte loads or stores) and spills nothing, on sm_90 and sm_80.

Both compile_check runs start together (two processes: the compiler is single-threaded and CI has two cores)."""
import json
import os
import subprocess
import sys

import pytest

from kernels.triton import attention

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="triton's bundled ptxas is a Linux binary")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
    # every kernel, the attention mask/bias combinations and the unaligned layout, first config, sm_90
    "all": ["--arch", "90", "--variants", "combos"],
    # what the assertions below need: the attention kernels at d = 88, aligned, every config, sm_90 and sm_80
    "attention": ["--only", "attention", "--arch", "90", "80", "--head-dims", "88", "--variants", "plain",
                  "--layouts", "aligned", "--configs", "all"],
}


@pytest.fixture(scope="module")
def compile_runs(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path_factory.mktemp("compile_check")
    procs = {name: (subprocess.Popen([sys.executable, "-m", "kernels.compile_check", *args, "--json",
                                      str(out / f"{name}.json")], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out / f"{name}.json")
             for name, args in RUNS.items()}
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finished(compile_runs, name):
    """(stdout, rows) of one compile_check run, after checking it compiled everything."""
    proc, path = compile_runs[name]
    stdout, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout[-6000:]
    with open(path) as f:
        result = json.load(f)
    assert result["failures"] == [] and result["rows"], stdout[-6000:]
    return stdout, result["rows"]


def test_every_triton_kernel_compiles_for_sm90(compile_runs):
    stdout, rows = finished(compile_runs, "all")
    kernels = {r["kernel"] for r in rows}
    assert {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel", "_rms_norm_bwd_kernel",
            "_attn_pool_bwd_dx_kernel", "_masked_gather_bwd_kernel"} <= kernels, stdout[-3000:]


def test_attention_d88_loads_16_byte_vectors_without_spills(compile_runs):
    stdout, rows = finished(compile_runs, "attention")
    D0, D1 = attention.split_head_dim(88)
    fwd = attention._wide_tiles_fit(attention._FWD_CONFIGS, {}, D0=D0, D1=D1, HAS_BIAS=False)
    tuned = {"_attention_fwd_kernel": fwd, "_attention_bwd_dkdv_kernel": attention._DKDV_CONFIGS,
             "_attention_bwd_dq_kernel": attention._DQ_CONFIGS}
    for arch in (90, 80):
        for kernel, configs in tuned.items():   # every config the autotuner can pick was compiled
            assert len([r for r in rows if r["arch"] == arch and r["kernel"] == kernel]) == len(configs), kernel
    bad = []
    for r in rows:
        pipelined = r["kernel"] in tuned           # K/V (or Q/dO) stream through a loop: cp.async, tensor cores
        ok = (r["spill"] == 0 and r["ld2"] == 0 and r["st2"] == 0 and r["ld16"] + r["cp16"] > 0
              and (not pipelined or r["cp16"] > 0 and r["mma"] > 0))
        if not ok:
            bad.append(" ".join(f"{k}={v}" for k, v in r.items()))
    assert not bad, "tiles that spill or load element by element:\n" + "\n".join(bad)


def test_wide_forward_tiles_only_where_they_fit():
    """The 128 x 128 forward tiles are timed at d = 128 without a bias only (they spill at d = 88 or with a bias)."""
    def wide(D, bias):
        D0, D1 = attention.split_head_dim(D)
        kept = attention._wide_tiles_fit(attention._FWD_CONFIGS, {}, D0=D0, D1=D1, HAS_BIAS=bias)
        return [c.kwargs["BLOCK_N"] for c in kept].count(128)
    assert wide(128, False) == 1 and wide(64, False) == 1
    assert wide(88, False) == wide(128, True) == 0
