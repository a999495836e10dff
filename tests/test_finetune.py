"""Fine-tuning and probing through train.py (--stage finetune) and the fine-tuned classifier's multi-view test
(eval.py classify --finetuned): layer-wise lr groups, learning, frozen encoders that stay bit-equal, --init from a
stage-1 run, named errors. CPU, the 56 px world of conftest.py, one process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ivmini import dist
from ivmini.classify import multi_view, topk_correct
from ivmini.config import train_config, vision_config
from ivmini.stages import finetune
from ivmini.stages.common import param_groups
from ivmini.vit import VideoViT

from test_train import ROOT, env, metrics
from test_train import train as train_stage1


def run_finetune(out, world, *args):
    cmd = [sys.executable, "train.py", "--stage", "finetune", "--out", str(out),
           "--data", os.path.join(world, "annotations", "classify_train.csv"), f"--data-root={world}",
           "--img-size=56", "--workers=0", "--log-every=1", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def weights(out, step=None):
    folder = os.path.join(out, "checkpoints")
    return dist.consolidate(os.path.join(folder, f"step_{step:08d}") if step else dist.latest_checkpoint(folder))


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, world):
    out = tmp_path_factory.mktemp("s1") / "run"
    train_stage1(out, world, "--max-steps=2")
    return str(out)


def test_layer_wise_lr_groups_have_the_official_scales():
    cfg = train_config("finetune", layer_decay=0.5, weight_decay=0.05)
    model = VideoViT(vision_config("tiny", depth=3, heads="classify", num_classes=5))
    groups = finetune.optimizer_groups(model, cfg)
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(scale_of) == len(params)
    expect = {"patch_embed.proj.weight": (0.5 ** 4, 0.05), "cls_token": (0.5 ** 4, 0.0), "pos_embed": (0.5 ** 4, 0.0),
              "blocks.0.attn.qkv.weight": (0.5 ** 3, 0.05), "blocks.2.mlp.fc2.bias": (0.5 ** 1, 0.0),
              "clip_projector.cross_attn.q.weight": (1.0, 0.05), "head.weight": (1.0, 0.05), "fc_norm.bias": (1.0, 0.0)}
    for name, want in expect.items():
        assert scale_of[id(params[name])] == pytest.approx(want), name
    # the stages without layer decay keep exactly two groups, the old weight-decay rules
    assert [g["weight_decay"] for g in param_groups(model, 0.05)] == [0.05, 0.0]


def test_full_finetune_learns_and_the_multi_view_test_recomputes(tmp_path, world, stage1_run):
    out = tmp_path / "ft"
    # the whole training split (28 clips) per step, fresh augmentation each epoch: from ~ln 8 to ~1.45 in 30 steps
    run_finetune(out, world, "--init=", "--max-steps=30", "--warmup-steps=3", "--batch-size=28", "--lr-scaling=none",
                 "--base-lr=2e-3", "--min-lr=1e-4")
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 31)) and all("top1" in r for r in m)
    first, last = np.mean([r["loss"] for r in m[:5]]), np.mean([r["loss"] for r in m[-5:]])
    assert last < first - 0.3, (first, last)

    res = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, "eval.py", "classify", "--ckpt", str(out), "--finetuned",
                           "--data", os.path.join(world, "annotations", "classify_test.csv"), "--data-root", world,
                           "--out", str(res), "--clips=2", "--crops=3"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("classify (fine-tuned)") and "2 clips" in proc.stdout
    r = json.loads(res.read_text())
    scores = torch.from_numpy(np.load(tmp_path / r["matrices"]["scores"]))          # (videos, classes)
    labels = torch.tensor([p["label"] for p in r["predictions"]])
    assert scores.shape == (len(r["predictions"]), 8) and r["videos"] == len(labels) > 0
    assert torch.allclose(scores.sum(1), torch.ones(len(labels), dtype=scores.dtype))   # averaged softmaxes
    assert [p["pred"] for p in r["predictions"]] == scores.argmax(1).tolist()
    assert r["metrics"]["all"]["top1"] == pytest.approx(100 * float((scores.argmax(1) == labels).double().mean()))
    assert r["metrics"]["all"]["top5"] == pytest.approx(100 * float(topk_correct(scores, labels, 5).double().mean()))

    # a checkpoint that is not a fine-tuned classifier: a named error
    bad = subprocess.run([sys.executable, "eval.py", "classify", "--ckpt", stage1_run, "--finetuned",
                          "--out", str(tmp_path / "bad.json")], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "is not fine-tuned" in bad.stderr and "--stage finetune" in bad.stderr


@pytest.mark.parametrize("head", ["linear", "attentive"])
def test_probes_from_a_stage1_run_keep_the_encoder_bit_equal(tmp_path, world, stage1_run, head):
    out = tmp_path / head
    proc = run_finetune(out, world, f"--init={stage1_run}", f"--head={head}", "--max-steps=3", "--warmup-steps=0",
                        "--ckpt-every=1", "--keep-ckpts=3")
    log = proc.stdout + proc.stderr
    assert "backbone loaded from the checkpoint" in log and "clip_decoder" in log and "mae_decoder" in log
    start = dist.consolidate(dist.latest_checkpoint(os.path.join(stage1_run, "checkpoints")))
    first, final = weights(out, 1), weights(out)
    trained = finetune.TRAINED[head]
    for name, value in final.items():
        top = name.split(".")[0]
        if top in trained:
            if top != "fc_norm":                     # fc_norm's LayerNorm barely moves at first: head and pool must
                assert not torch.equal(value, first[name]), f"{name} did not train"
        else:
            assert torch.equal(value, start[name]), f"{name} changed in a frozen encoder"
    if head == "attentive":                          # a fresh pool, not the stage-1 one
        assert not torch.equal(final["clip_projector.cross_attn.q.weight"], start["clip_projector.cross_attn.q.weight"])


def test_multi_view_takes_interleaved_clips_and_crops_along_the_long_side():
    T, clips, H, W = 3, 2, 4, 8
    frames = torch.arange(clips * T, dtype=torch.uint8)[:, None, None, None].expand(-1, H, W, 3).clone()
    frames[:, :, :, 0] = torch.arange(W, dtype=torch.uint8) * 10          # red channel = column x 10
    views = multi_view(frames, clips, 3, size=H)                          # (6, 3, T, 4, 4)
    assert views.shape == (6, 3, T, H, H)
    mean, std = 0.485 * 255, 0.229 * 255
    red = views[:, 0] * std + mean                                        # (6, T, 4, 4) back to 0..255
    assert torch.allclose(red[0, 0, 0], torch.tensor([0., 10, 20, 30]), atol=1e-3)     # crop at the start
    assert torch.allclose(red[1, 0, 0], torch.tensor([20., 30, 40, 50]), atol=1e-3)    # the centre
    assert torch.allclose(red[2, 0, 0], torch.tensor([40., 50, 60, 70]), atol=1e-3)    # the end
    green = views[:, 1, :, 0, 0] * 0.224 * 255 + 0.456 * 255               # (6, T): the frame numbers
    assert torch.allclose(green[0], torch.tensor([0., 2, 4]), atol=1e-3)   # clip 0: frames 0, 2, 4
    assert torch.allclose(green[3], torch.tensor([1., 3, 5]), atol=1e-3)   # clip 1: frames 1, 3, 5


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="--task.head='mlp' must be full, linear or attentive"):
        train_config("finetune", head="mlp")
    with pytest.raises(ValueError, match="layer-decay"):
        train_config("finetune", layer_decay=0)
