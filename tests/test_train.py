"""Stage-1 training end to end (CPU, gloo): FSDP2 equivalence, exact resume, atomic checkpoints, faults,
export, learning, and the default command. Runs train.py as a subprocess, the way users do."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ivmini import dist
from ivmini.checkpoint import load_official

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IVMINI_BACKEND")}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return e


def train(out, world, *args, nproc=1, check=True, inject_nan=None, **kw):
    base = ["train.py", "--stage", "1", "--out", str(out), "--data", os.path.join(world, "annotations", "stage1_train.txt"),
            f"--data-root={world}", "--img-size=56", "--workers=0", "--log-every=1", *args]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
                             if nproc > 1 else []), *base]
    e = dict(env(), **({"IVMINI_INJECT_NAN": inject_nan} if inject_nan else {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600, **kw)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_params(out):
    return dist.consolidate(dist.latest_checkpoint(os.path.join(out, "checkpoints")))


def test_two_ranks_equal_one_rank_on_the_union_of_batches(tmp_path, world):
    """FSDP2 on 2 processes with 4 clips each == 1 process with those 8 clips (per-sample seeds make the
    data and masks independent of the rank layout); equal to fp32 rounding."""
    train(tmp_path / "one", world, "--max-steps=4", "--batch-size=8")
    train(tmp_path / "two", world, "--max-steps=4", "--batch-size=4", nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1, abs(a["loss"])), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1, a["grad_norm"]), (a, b)
    p1, p2 = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    assert p1.keys() == p2.keys()
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_is_bit_identical(tmp_path, world):
    """Run 6 steps straight; separately resume from the straight run's step-3 checkpoint and run to 6:
    the same loss sequence and bit-identical parameters."""
    train(tmp_path / "straight", world, "--max-steps=6", "--ckpt-every=3", "--keep-ckpts=3", "--accum=2",
          "--batch-size=2")
    os.makedirs(tmp_path / "resumed" / "checkpoints")
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_00000003",
                    tmp_path / "resumed" / "checkpoints" / "step_00000003")
    train(tmp_path / "resumed", world, "--max-steps=6", "--ckpt-every=3", "--accum=2", "--batch-size=2", "--resume")
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight[3:]]
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], dist.consolidate(str(tmp_path / "straight" / "checkpoints" / "step_00000003"))[k])
                   for k in a)   # and training did change them


def test_unfinished_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000005").mkdir(parents=True)
    (root / "step_00000005" / "COMPLETE").write_text("step 5\n")
    (root / "step_00000010").mkdir()                       # crashed before its marker
    (root / "step_00000012.tmp").mkdir()                   # crashed mid-write
    (root / "step_00000012.tmp" / "COMPLETE").write_text("")
    assert dist.latest_checkpoint(str(root)) == str(root / "step_00000005")
    assert dist.latest_checkpoint(str(tmp_path / "nothing")) is None


def test_nan_on_one_rank_skips_the_step_everywhere_or_aborts(tmp_path, world):
    proc = train(tmp_path / "skip", world, "--max-steps=4", "--batch-size=2", inject_nan="2:1", nproc=2)
    m = metrics(tmp_path / "skip")
    assert [r["skips"] for r in m] == [0, 0, 1, 1]
    assert "non-finite loss on rank(s) [1] at step 2" in proc.stderr
    assert all(x == x for r in m for x in (r["loss"],) if r["step"] != 3)
    proc = train(tmp_path / "abort", world, "--max-steps=4", "--batch-size=2", "--max-skips=0", "--ckpt-every=1",
                 inject_nan="1", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "aborting without a checkpoint" in proc.stderr
    assert dist.latest_checkpoint(str(tmp_path / "abort" / "checkpoints")).endswith("step_00000001")


def test_sigterm_writes_a_checkpoint_and_resume_continues(tmp_path, world):
    out = tmp_path / "sig"
    cmd = [sys.executable, "train.py", "--stage", "1", "--out", str(out), "--data",
           os.path.join(world, "annotations", "stage1_train.txt"), f"--data-root={world}", "--img-size=56",
           "--workers=0", "--log-every=1",
           "--max-steps=1000", "--batch-size=2", "--ckpt-every=1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(out / "metrics.jsonl") and metrics(out)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    path = dist.latest_checkpoint(str(out / "checkpoints"))
    step = json.load(open(os.path.join(path, "meta.json")))["step"]
    assert 1 <= step < 1000
    train(out, world, "--max-steps", str(step + 2), "--batch-size=2", "--resume")
    assert metrics(out)[-1]["step"] == step + 2


def test_export_loads_with_load_official_and_loss_decreases(tmp_path, world):
    """50 steps of the tiny recipe: the loss falls well below its start (random teachers: the student
    learns to predict them); the exported file loads strictly as the official stage-1 model."""
    out = tmp_path / "learn"
    train(out, world, "--max-steps=50", "--batch-size=8")
    losses = [m["loss"] for m in metrics(out)]
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:3]) / 3, losses
    subprocess.run([sys.executable, "-m", "ivmini.checkpoint", "export", str(out), str(tmp_path / "s1.pt")],
                   cwd=ROOT, env=env(), check=True, capture_output=True)
    kwargs = json.load(open(tmp_path / "s1.json"))["kwargs"]
    model = load_official("stage1_pretrain", str(tmp_path / "s1.pt"), **kwargs)
    trained = final_params(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_default_command_runs(tmp_path):
    """`torchrun --nproc_per_node=2 train.py --stage 1` with nothing else (shortened to 3 steps): the
    synthetic world is generated on first use, progress is shown, metrics and a checkpoint are left."""
    e = dict(env(), IVMINI_DATA=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           "train.py", "--stage", "1", "--max-steps", "3", "--out", str(tmp_path / "run")],
                          cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stage 1: 100%" in proc.stderr
    assert proc.stderr.count("SMOKE RUN") == 2 and proc.stderr.count("kernels: backend") == 1   # rank 0 only
    assert metrics(tmp_path / "run")[-1]["step"] == 3
    assert dist.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("step_00000003")


def test_recompute_epochs_and_fixed_lr(tmp_path, world):
    """--act-ckpt recomputes every Block in the backward and changes nothing else (same losses and weights);
    --epochs sets the length from the data size; --lr-scaling=none takes base_lr as the rate."""
    train(tmp_path / "plain", world, "--max-steps=2", "--batch-size=4")
    train(tmp_path / "ckpt", world, "--max-steps=2", "--batch-size=4", "--act-ckpt=true")
    assert [m["loss"] for m in metrics(tmp_path / "plain")] == [m["loss"] for m in metrics(tmp_path / "ckpt")]
    a, b = final_params(tmp_path / "plain"), final_params(tmp_path / "ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(world, "annotations", "stage1_train.txt")) as f:
        clips = sum(1 for line in f if line.strip())
    train(tmp_path / "epoch", world, "--epochs=1", "--warmup-epochs=0", "--batch-size=8", "--lr-scaling=none",
          "--base-lr=0.001", "--min-lr=0.0001")
    m = metrics(tmp_path / "epoch")
    assert m[-1]["step"] == clips // 8
    assert m[0]["lr"] == pytest.approx(0.001) and m[-1]["lr"] < 0.001


def test_act_ckpt_recomputes_every_trained_block_and_no_frozen_one():
    """dist.parallelize finds Blocks by type: with act_ckpt each trained Block runs its forward twice per
    step (once more in the backward), frozen modules' Blocks once."""
    script = """
import torch
from ivmini import dist
from ivmini.config import vision_config
from ivmini.layers import Block
from ivmini.vit import VideoViT
dist.init()
model, frozen = VideoViT(vision_config("tiny", depth=2, img_size=28)), VideoViT(vision_config("tiny", depth=3, img_size=28))
frozen.requires_grad_(False)
dist.parallelize(model, [frozen], torch.device("cpu"), act_ckpt=True)
calls = {"model": 0, "frozen": 0}
for name, m in (("model", model), ("frozen", frozen)):
    for b in m.modules():
        if isinstance(b, Block):
            b.register_forward_pre_hook(lambda mod, args, name=name: calls.__setitem__(name, calls[name] + 1))
video = torch.randn(1, 3, 8, 28, 28)
with torch.no_grad():
    frozen(video)
model(video).pooled.sum().backward()
print(calls["model"], calls["frozen"])
dist.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["4", "3"], out.stdout
