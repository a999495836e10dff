"""The main job under everyday faults, run the way users run it (train.py / torchrun subprocesses, DataLoader
workers): run folders that are never clobbered or shared, --resume where users point, validation before
anything is written, the end-of-run summary, SIGTERM to the whole process group, the death of the launcher,
the corrupt-data limit across ranks, workers and epochs, and checkpoints whose bytes must not reach pickle."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ivmini import dist
from ivmini.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("w") / "world"), n=40, size=56, seed=5, workers=1)


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IVMINI_BACKEND")}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    return e


def command(out, world, *args, nproc=1, data=None):
    base = ["train.py", "--out", str(out), "--data", data or os.path.join(world, "annotations", "stage1_train.txt"),
            f"--data-root={world}", "--img-size=56", "--log-every=1", "--batch-size=2", *args]
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] if nproc > 1 else []
    return [sys.executable, *launcher, *base]


def train(out, world, *args, nproc=1, check=True, data=None):
    proc = subprocess.run(command(out, world, *args, nproc=nproc, data=data), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_for_metrics(out, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(out, "metrics.jsonl")) and metrics(out):
            return
        time.sleep(0.2)
    raise AssertionError(f"no metrics from {out} (exit {proc.poll()})")


def processes_of(marker):
    """pids of the live processes whose command line contains `marker` (ranks and their DataLoader workers)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if marker in cmd and not zombie and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


# ---------------------------------------------------------------------------------------------
# run folders

def test_a_second_run_into_a_used_folder_is_refused_and_overwrite_starts_over(tmp_path, world):
    out = tmp_path / "run"
    train(out, world, "--max-steps=2", "--workers=0")
    before = (open(out / "config.json").read(), metrics(out), sorted(os.listdir(out / "checkpoints")))
    proc = train(out, world, "--max-steps=3", "--workers=0", "--seed=1", check=False)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert (open(out / "config.json").read(), metrics(out), sorted(os.listdir(out / "checkpoints"))) == before
    train(out, world, "--max-steps=3", "--workers=0", "--seed=1", "--overwrite")
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert json.load(open(out / "config.json"))["seed"] == 1
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000003"]


def test_resume_from_the_run_folder_its_checkpoints_or_one_step_and_prune_only_this_run(tmp_path, world):
    out = tmp_path / "run"
    train(out, world, "--max-steps=2", "--workers=0", "--ckpt-every=1", "--keep-ckpts=1")
    foreign = out / "checkpoints" / "step_00000000"              # another run's checkpoint, kept by pruning
    shutil.copytree(out / "checkpoints" / "step_00000002", foreign)
    meta = json.load(open(foreign / "meta.json"))
    json.dump(dict(meta, run_id="someone-else", step=0), open(foreign / "meta.json", "w"))
    train(out, world, "--max-steps=3", "--workers=0", "--ckpt-every=1", "--keep-ckpts=1", f"--resume={out}")
    train(out, world, "--max-steps=4", "--workers=0", "--ckpt-every=1", "--keep-ckpts=1",
          f"--resume={out / 'checkpoints'}")
    train(out, world, "--max-steps=5", "--workers=0", "--ckpt-every=1", "--keep-ckpts=1",
          f"--resume={out / 'checkpoints' / 'step_00000004'}")
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000000", "step_00000005"]
    proc = train(out, world, "--max-steps=5", "--workers=0", "--resume", check=False)
    assert proc.returncode == 2 and "is at step 5, which reaches --max-steps=5" in proc.stderr
    proc = train(out, world, "--max-steps=9", "--workers=0", "--resume", "--preset=S", check=False)
    assert proc.returncode == 2 and "embed_dim=192" in proc.stderr and "embed_dim=384" in proc.stderr
    proc = train(tmp_path / "other", world, "--max-steps=9", "--workers=0", f"--resume={tmp_path / 'nothing'}",
                 check=False)
    assert proc.returncode == 2 and "no complete checkpoint in" in proc.stderr


@pytest.mark.parametrize("args,message", [       # (every check and its message: tests/test_config.py)
    (["--batch-size=0"], "--batch-size=0 must be at least 1"), (["--base-lr=nan"], "--base-lr=nan"),
    (["--set", "base_lr=x"], "expects float, got 'x'"), (["--frobnicate", "--max-steps=3"], "unknown option")])
def test_bad_options_fail_before_anything_is_written(tmp_path, world, args, message):
    proc = train(tmp_path / "run", world, *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("kind,message", [("folder", "is a directory, not an annotation file"),
                                          ("video", "looks like a video (binary data), not an annotation list"),
                                          ("empty", "holds no samples")])
def test_data_mistakes_are_usage_errors_naming_the_file(tmp_path, world, kind, message):
    data = {"folder": world, "video": os.path.join(world, "videos", sorted(os.listdir(os.path.join(world, "videos")))[0]),
            "empty": str(tmp_path / "empty.txt")}[kind]
    (tmp_path / "empty.txt").write_text("")
    proc = train(tmp_path / "run", world, "--workers=0", check=False, data=data)
    assert proc.returncode == 2 and message in proc.stderr and data in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "run")


def test_a_run_ends_with_a_summary(tmp_path, world):
    proc = train(tmp_path / "run", world, "--max-steps=2", "--workers=0")
    tail = proc.stderr[proc.stderr.index("finished at step 2"):]
    for what in ("clips/s", "loss", "metrics.jsonl", "step_00000002", "python -m ivmini.checkpoint export"):
        assert what in tail, what
    assert proc.stderr.count("SMOKE RUN") == 2           # one line per random teacher, once
    assert proc.stderr.count("kernels: backend") == 1


def test_one_writer_per_run_folder(tmp_path, world):
    """A second run on a folder in use is refused and changes nothing; once the first one is killed (-9),
    its lock is stale and a resume takes over."""
    out = tmp_path / "run"
    first = subprocess.Popen(command(out, world, "--max-steps=100000", "--ckpt-every=1", "--workers=1", nproc=2),
                             cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        wait_for_metrics(out, first)
        while dist.latest_checkpoint(str(out)) is None:
            time.sleep(0.2)
        config = open(out / "config.json").read()
        proc = train(out, world, "--max-steps=100000", "--workers=0", "--resume", "--seed=7", check=False)
        assert proc.returncode == 2 and "is in use by another run" in proc.stderr, proc.stderr[-2000:]
        assert open(out / "config.json").read() == config
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    step = json.load(open(os.path.join(dist.latest_checkpoint(str(out)), "meta.json")))["step"]
    train(out, world, f"--max-steps={step + 1}", "--workers=0", "--resume")
    assert not os.path.exists(out / "LOCK")


# ---------------------------------------------------------------------------------------------
# signals and process death, on torchrun with DataLoader workers

def test_sigterm_to_the_process_group_checkpoints_with_workers(tmp_path, world):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out, world, "--max-steps=100000", "--ckpt-every=100000", "--workers=2", nproc=2),
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_metrics(out, proc)
    os.killpg(proc.pid, signal.SIGTERM)                   # what a terminal or a scheduler does
    _, err = proc.communicate(timeout=120)
    assert "stopping on a signal" in err, err[-3000:]
    assert "killed by signal" not in err
    path = dist.latest_checkpoint(str(out))
    assert path is not None, err[-3000:]
    step = json.load(open(os.path.join(path, "meta.json")))["step"]
    assert step >= 1
    train(out, world, f"--max-steps={step + 2}", "--workers=2", "--resume", nproc=2)
    assert metrics(out)[-1]["step"] == step + 2


def test_ranks_and_workers_die_with_their_launcher(tmp_path, world):
    out = tmp_path / "orphans"
    proc = subprocess.Popen(command(out, world, "--max-steps=100000", "--ckpt-every=2", "--workers=2", nproc=2),
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_metrics(out, proc)
    assert len(processes_of(str(out))) >= 3                # torchrun, 2 ranks (and their workers)
    proc.kill()                                            # kill -9 of torchrun alone
    proc.wait()
    deadline = time.time() + 20
    while processes_of(str(out)) and time.time() < deadline:
        time.sleep(0.5)
    assert processes_of(str(out)) == [], "orphaned ranks or workers are still running"
    snapshot = sorted(os.listdir(out / "checkpoints")) if os.path.exists(out / "checkpoints") else []
    n = len(metrics(out))
    time.sleep(3)
    assert len(metrics(out)) == n and (sorted(os.listdir(out / "checkpoints"))
                                       if os.path.exists(out / "checkpoints") else []) == snapshot


# ---------------------------------------------------------------------------------------------
# bad data: the limit holds over ranks, workers and epochs

def corrupt_list(world, tmp_path, total, bad_lines, bad_files):
    """A stage-1 list of `total` lines cycling over the world's clips, of which `bad_lines` (evenly spaced) name
    one of `bad_files` unreadable files."""
    with open(os.path.join(world, "annotations", "stage1_train.txt")) as f:
        good = [line for line in f if line.strip()]
    for j in range(bad_files):
        (tmp_path / f"bad{j}.mp4").write_bytes(os.urandom(2000))
    bad_at = {i * total // bad_lines: n for n, i in enumerate(range(bad_lines))}
    lines = [f"{tmp_path / f'bad{bad_at[i] % bad_files}.mp4'} -1 -1 -1 0\n" if i in bad_at else good[i % len(good)]
             for i in range(total)]
    (tmp_path / "list.txt").write_text("".join(lines))
    return str(tmp_path / "list.txt")


def test_bad_data_is_counted_over_ranks_workers_and_epochs(tmp_path, world):
    """1 unreadable file in a 40-sample list (2.5%), allowed 5%: over 3 epochs on 2 ranks x 2 workers the run
    trains to the end, the metrics carry the global count (one failure per epoch) and the path is logged once."""
    data = corrupt_list(world, tmp_path, total=40, bad_lines=1, bad_files=1)
    proc = train(tmp_path / "run", world, "--max-steps=30", "--batch-size=2", "--workers=2", "--max-bad-data=0.05",
                 nproc=2, data=data)
    m = metrics(tmp_path / "run")
    assert m[-1]["step"] == 30 and m[-1]["skipped_samples"] == 3 and m[-1]["drawn"] == 30 * 2 * 2 + 3
    assert proc.stderr.count("skipped ") == 1 and "bad0.mp4" in proc.stderr


def test_more_than_one_percent_bad_data_stops_the_run_naming_examples(tmp_path, world):
    """5% unreadable samples (two bad files, each listed 10 times) on 2 ranks x 2 workers: the run stops with
    examples, instead of training to the end with each worker counting distinct paths alone."""
    data = corrupt_list(world, tmp_path, total=400, bad_lines=20, bad_files=2)
    proc = train(tmp_path / "run", world, "--max-steps=300", "--batch-size=2", "--workers=2", nproc=2, data=data,
                 check=False)
    assert proc.returncode != 0
    assert "could not be decoded, more than the allowed 1 %" in proc.stderr and "bad0.mp4" in proc.stderr
    assert metrics(tmp_path / "run")[-1]["step"] < 300


# ---------------------------------------------------------------------------------------------
# untrusted checkpoint bytes never reach pickle

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))                  # creates the marker file when unpickled


@pytest.mark.parametrize("target", ["rank_0.pt", ".metadata"])
def test_crafted_pickles_in_a_checkpoint_are_refused(tmp_path, world, target):
    out = tmp_path / "run"
    train(out, world, "--max-steps=1", "--workers=0")
    path = dist.latest_checkpoint(str(out))
    marker = tmp_path / "pwned"
    with open(os.path.join(path, target), "wb") as f:
        if target == "rank_0.pt":
            torch.save({"python": Payload(str(marker))}, f)
        else:
            pickle.dump(Payload(str(marker)), f)
    proc = train(out, world, "--max-steps=2", "--workers=0", "--resume", check=False)
    assert proc.returncode != 0 and "refusing to load it" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()
