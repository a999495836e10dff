"""Distillation of a student from a stage-2 encoder (`train.py --stage distill`, ivmini/stages/distill.py): the
teacher's block indices follow the official rule and its targets are those blocks; it is loaded bit-equal from a
stage-2 run and stays frozen; the loss falls at a fixed learning rate; the student exports and loads strictly
with load_official. The teacher is a 2-step stage-2 run made here (56 px world of conftest.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ivmini.checkpoint import load_official
from ivmini.config import train_config, vision_config
from ivmini.data.datasets import collate
from ivmini.stages import distill
from ivmini.vit import VideoViT

from test_train import ROOT, env, final_params, metrics   # the world fixture is in conftest.py
from test_train_stage2 import run, stage2


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, world, minilm):
    out = tmp_path_factory.mktemp("distill") / "stage2"
    stage2(out, world, "--max-steps=2", "--batch-size=4")
    return out


def distill_args(out, world, *args):
    return ("--stage", "distill", "--out", str(out), "--data", os.path.join(world, "annotations", "stage1_train.txt"),
            f"--data-root={world}", "--img-size=56", "--workers=0", "--log-every=1", *args)


def test_teacher_block_indices_follow_the_interval_rule():
    with torch.device("meta"):               # the 1B shapes without allocating its weights
        teacher = distill.Stage2Teacher(vision_config("1B"), 6, 3.34)
    assert teacher.return_index == (23, 26, 29, 33, 36, 39)
    assert distill.Stage2Teacher(vision_config("tiny", depth=3), 2, 1).return_index == (1, 2)
    with pytest.raises(ValueError, match="cannot return 6 layers"):
        distill.Stage2Teacher(vision_config("tiny"), 6, 3.34)


def test_teacher_targets_are_its_blocks_normalised():
    """layers[k] = block return_index[k]'s output (via VideoViT's independent return_idx path), L2-normalised;
    pooled = the pool's output, normalised; attn: the pool attention over the T*N patches."""
    torch.manual_seed(0)
    cfg = vision_config("tiny", img_size=28, num_frames=3, depth=4)
    teacher = distill.Stage2Teacher(cfg, 2, 2)                 # blocks 3 - int(i * 2) = {1, 3}
    video = torch.randn(2, 3, 3, 28, 28)
    out = teacher(video)
    plain = VideoViT(teacher.cfg)
    plain.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for k, block in enumerate((1, 3)):
            x = plain(video, return_idx=block - cfg.depth).tokens
            torch.testing.assert_close(out.layers[k], x / x.norm(dim=-1, keepdim=True))
        pooled = plain(video).pooled
    torch.testing.assert_close(out.pooled, pooled / pooled.norm(dim=-1, keepdim=True))
    assert out.attn.shape == (2, 3 * 4) and torch.all(out.attn > 0)


def test_teacher_loads_from_the_run_and_stays_frozen(teacher_run, world):
    """Built in-process as train.py builds it: the teacher's weights are the stage-2 run's vision encoder (position
    table resized 4 -> 8 frames), its decoders dropped; after 3 optimizer steps it is bit-equal and has no grads."""
    cfg = train_config("distill", "tiny", teacher=str(teacher_run), img_size=56, batch_size=2,
                       data=os.path.join(world, "annotations", "stage1_train.txt"), data_root=world)
    student, frozen = distill.build(cfg, torch.device("cpu"))
    teacher = frozen["teacher"]
    run_sd = final_params(teacher_run)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for k, v in before.items():
        if k != "pos_embed":
            assert torch.equal(v, run_sd["vision_encoder." + k]), k
    assert before["pos_embed"].shape[1] == 1 + 8 * 4 * 4 and not any(k.startswith("clip_decoder") for k in before)
    data = distill.dataset(cfg)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student.train()
    teacher.train()                                            # stays in eval mode
    assert not teacher.training
    for step in range(3):
        batch = collate([data[i] for i in (2 * step, 2 * step + 1)])
        loss, values = distill.forward_loss(student, frozen, batch, cfg, epoch=0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert set(values) == {"loss", "middle", "final"} and 0 < values["loss"] < 8
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_loss_falls_and_the_student_exports(teacher_run, world, tmp_path):
    """30 steps at a fixed learning rate: the loss falls well below its start; the export loads strictly as
    load_official("stage1_pretrain") with MLP decoders and no MAE branch, equal to the trained weights."""
    out = tmp_path / "student"
    run(*distill_args(out, world, f"--teacher={teacher_run}", "--max-steps=30", "--batch-size=4",
                      "--base-lr=2e-3", "--min-lr=2e-3", "--warmup-steps=0", "--lr-scaling=none"))
    losses = [m["loss"] for m in metrics(out)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3, losses
    subprocess.run([sys.executable, "-m", "ivmini.checkpoint", "export", str(out), str(tmp_path / "s.pt")],
                   cwd=ROOT, env=env(), check=True, capture_output=True)
    info = json.load(open(tmp_path / "s.json"))
    assert info["kind"] == "stage1_pretrain" and info["kwargs"]["clip_decoder_mlp"]
    model = load_official(info["kind"], str(tmp_path / "s.pt"), **info["kwargs"])
    assert model.cfg.mae_return_layer == 0 and "mae_pos_embed" not in model.state_dict()
    trained = final_params(out)
    assert model.state_dict().keys() == trained.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_a_teacher_that_is_not_stage_2_is_named(tmp_path, world):
    """A stage-1 run as --teacher: a usage error naming it, before any training."""
    out = tmp_path / "s1"
    run("--stage", "1", "--out", str(out), "--data", os.path.join(world, "annotations", "stage1_train.txt"),
        f"--data-root={world}", "--img-size=56", "--workers=0", "--max-steps=1", "--batch-size=2")
    proc = run(*distill_args(tmp_path / "d", world, f"--teacher={out}", "--max-steps=1"), check=False)
    assert proc.returncode == 2 and "is not a stage-2" in proc.stderr, proc.stderr[-2000:]
