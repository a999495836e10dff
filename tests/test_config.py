"""Training configuration: stage recipes, command-line options (top level, nested task options, --set),
usage errors naming the option, the help text, optimizer groups and the learning-rate schedule."""
import subprocess
import sys

import pytest
import torch

import train
from ivmini.stages.common import param_groups
from ivmini.config import RECIPES, TrainConfig, train_config
from ivmini.vit import VideoViT
from ivmini.config import vision_config


def test_recipes_carry_the_official_numbers():
    big = train_config(1, "1B")
    assert (big.batch_size, big.epochs, big.warmup_epochs, big.base_lr, big.min_lr) == (32, 301, 40, 1.5e-4, 1e-5)
    assert (big.beta1, big.beta2, big.eps, big.weight_decay, big.clip_grad) == (0.9, 0.98, 1e-6, 0.05, 3.0)
    assert (big.task.clip_return_layer, big.task.mae_return_layer, big.task.mask_ratio) == (6, 4, 0.8)
    assert big.act_ckpt and big.lr_scaling == "batch256"
    assert train_config(1, "6B").batch_size == 8
    tiny = train_config(1, "tiny")
    assert tiny.epochs == 0 and tiny.max_steps == 300 and tiny.task == type(tiny.task)(
        num_frames=8, img_size=0, mask_ratio=0.8, clip_return_layer=2, mae_return_layer=2)
    assert {1, 2, "finetune"} <= set(RECIPES)
    ft = train_config("finetune", "1B")      # facts §2.7: SM 1B_ft_k710_f8.sh
    assert (ft.epochs, ft.warmup_epochs, ft.base_lr, ft.beta2, ft.weight_decay, ft.lr_scaling) == \
        (9, 2, 5e-5, 0.999, 0.05, "batch256")
    assert (ft.task.layer_decay, ft.task.drop_path, ft.task.label_smoothing, ft.task.num_frames) == (0.9, 0.3, 0.1, 8)


def test_stage2_recipe_carries_the_official_numbers():
    """1B: MM scripts/pretraining/stage2/1B/config.py (facts §3.1); tiny: MiniLM with mean pooling."""
    big = train_config(2, "1B")
    assert (big.batch_size, big.epochs, big.warmup_epochs, big.base_lr, big.min_lr, big.lr_scaling) == \
        (64, 10, 1, 5e-5, 5e-7, "none")
    assert (big.beta1, big.beta2, big.eps, big.weight_decay, big.clip_grad) == (0.9, 0.98, 1e-8, 0.05, 3.0)
    t = big.task
    assert (t.fusion_layer, t.embed_dim, t.num_frames, t.max_txt_l, t.text_pool, t.text_ckpt) == \
        (19, 512, 4, 32, "cls", True)
    assert (t.mask_ratio_video, t.mask_ratio_image, t.mlm_prob, t.temp, t.vtm_hard_negatives) == \
        (0.8, 0.5, 0.5, 0.07, True)
    tiny = train_config(2)
    assert (tiny.out, tiny.task.fusion_layer, tiny.task.text_pool, tiny.task.vision_init) == \
        ("runs/stage2", 4, "mean", "auto")
    assert (tiny.base_lr, tiny.task.mask_ratio_video, tiny.task.mask_ratio_image) == (5e-4, 0.5, 0.5)
    audio = train_config(2, audio="true")
    assert (audio.out, audio.task.loss_atc, audio.task.loss_avtc, audio.task.loss_avc) == \
        ("runs/stage2_audio", 1.0, 1.0, 0.0)                       # its own folder; ATC on for tiny (official 0)
    assert train_config(2, audio="true", out="runs/x").out == "runs/x"
    assert audio.task.captions_of_losses()["avtc"] == "av_caption"
    with pytest.raises(ValueError, match="loss-caption=.*avx"):
        train_config(2, loss_caption="vtc=caption,avx=av_caption")
    with pytest.raises(ValueError, match="--task.phase='frozen' must be masked or unmasked"):
        train_config(2, phase="frozen")


def test_command_line_sets_top_level_and_task_options():
    cfg = train.parse_args(["--stage", "1", "--preset", "S", "--max-steps", "7", "--batch-size=3", "--img-size=56",
                            "--task.mask-ratio=0.5", "--set", "task.loss_mae=2", "--set", "base_lr=3e-4",
                            "--compile", "--resume"])
    assert (cfg.preset, cfg.max_steps, cfg.batch_size, cfg.base_lr, cfg.compile, cfg.resume) == \
        ("S", 7, 3, 3e-4, True, "auto")
    assert (cfg.task.img_size, cfg.task.mask_ratio, cfg.task.loss_mae) == (56, 0.5, 2.0)
    assert isinstance(cfg, TrainConfig) and type(cfg.task.loss_mae) is float
    # recipes are not shared state: changing one run's task does not change the next recipe
    assert train_config(1, "S").task.mask_ratio == 0.8


@pytest.mark.parametrize("args,message", [
    (["--batch-size=abc"], "batch-size expects int, got 'abc'"),
    (["--set", "base_lr=x"], "base_lr expects float, got 'x'"),
    (["--compile=maybe"], "compile expects true or false"),
    (["--frobnicate=1"], "unknown option 'frobnicate'"),
    (["--task.frob=1"], "unknown option 'task.frob'"),
    (["--task=1"], "unknown option 'task'"),
    (["--frobnicate"], "unknown option 'frobnicate'"),
    (["--accum=0"], "--accum=0 must be at least 1"), (["--ckpt-every=0"], "--ckpt-every=0 must be at least 1"),
    (["--log-every=0"], "--log-every=0 must be at least 1"), (["--max-steps=0"], "--max-steps=0 must be at least 1"),
    (["--base-lr=-1"], "--base-lr=-1.0 must be a finite number > 0"), (["--img-size=60"], "multiple of the patch"),
    (["--max-bad-data=1"], "--max-bad-data=1.0 must be in [0, 1)"),
    (["--max-steps"], "--max-steps needs a value"),
    (["--preset", "XL"], "unknown preset 'XL'"),
    (["--set", "stage=2"], "set stage with --stage"), (["--preset=S", "--set", "preset=1B"], "set preset with --preset"),
    (["--stage", "7"], "invalid choice: 7"),
    (["--backend=fast"], "--backend='fast'"),
    (["stray"], "unrecognised argument 'stray'"),
])
def test_bad_options_are_usage_errors_naming_the_option(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_option_with_its_comment_and_the_recipe_default():
    out = subprocess.run([sys.executable, "train.py", "--preset", "1B", "--help"], capture_output=True, text=True,
                         cwd=train.__file__.rsplit("/", 1)[0], check=True).stdout
    for name in ("--max-steps=300", "--epochs=301", "--batch-size=32", "--clip-return-layer=6", "--act-ckpt=True"):
        assert name in out, name
    assert "student blocks distilled from the multimodal teacher" in out
    assert "Stages: 1, 2," in out and "finetune" in out.split("Stages:")[1].split(".")[0]
    lines = [line for line in out.splitlines() if line.startswith("  --") and "=" in line.split()[0]]
    assert len(lines) == len([f for f in TrainConfig.__dataclass_fields__ if f != "task"]) + \
        len(train_config(1).task.__dataclass_fields__)
    assert all(len(line.split(None, 1)) == 2 for line in lines), "every option has a one-line explanation"


def test_param_groups_follow_requires_grad_and_declared_no_decay_names():
    class Towers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = VideoViT(vision_config("tiny", depth=1))
            self.temp = torch.nn.Parameter(torch.tensor(0.07))
            self.frozen = torch.nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    model = Towers()
    decay, no_decay = param_groups(model, 0.05)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no = {names[i] for i in ids(no_decay["params"])}
    yes = {names[i] for i in ids(decay["params"])}
    assert {"vision.cls_token", "vision.pos_embed", "temp", "vision.blocks.0.attn.proj.bias"} <= no
    assert "vision.blocks.0.attn.qkv.weight" in yes and "vision.patch_embed.proj.weight" in yes
    assert not any(n.startswith("frozen.") for n in no | yes)
    assert len(no | yes) == sum(p.requires_grad for p in model.parameters())


def test_learning_rate_warmup_then_cosine():
    lrs = [train.lr_at(s, 1.0, 0.1, 5, 25) for s in range(25)]
    assert lrs[0] == 0 and lrs[4] == pytest.approx(1.0) and lrs[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert train.lr_at(25, 1.0, 0.1, 5, 25) == pytest.approx(0.1)
    assert lrs[15] == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi / 2)).item()))
