"""VideoViT.param_counts(): the parameters split into "backbone" (what every head shares) and "heads" (the rest).
The backbone of a preset must not depend on the heads or on the teachers' widths: that is what lets
`python -m ivmini.vit` (decoders for the official 3200/1408-wide teachers) and train.py (decoders for its small
random teachers) report the same backbone. Test: python -m pytest tests/test_vit_param_counts.py -q"""
import re
import subprocess
import sys
from pathlib import Path

from ivmini.config import vision_config
from ivmini.vit import VideoViT, count_params

VARIANTS = [("none", {}), ("classify", {"num_classes": 7}),
            ("distill", dict(clip_return_layer=2, mae_return_layer=2)),                  # the official widths
            ("distill", dict(clip_teacher_embed_dim=96, clip_teacher_final_dim=0, mae_teacher_embed_dim=64)),
            ("align", dict(sep_image_video_pos_embed=True))]


def test_backbone_and_heads_partition_the_parameters_and_the_backbone_is_shared():
    backbones = set()
    for heads, kw in VARIANTS:
        model = VideoViT(vision_config("tiny", heads=heads, **kw))
        n = model.param_counts()
        assert set(n) == {"backbone", "heads"} and n["backbone"] + n["heads"] == count_params(model), (heads, kw)
        backbones.add(n["backbone"] - (model.img_pos_embed.numel() if kw.get("sep_image_video_pos_embed") else 0))
        if heads == "none":
            assert n["heads"] == 0                    # every parameter of the bare encoder is backbone
        if heads == "classify":
            C = model.cfg.clip_embed_dim               # fc_norm (weight, bias) + head (7 x C, 7)
            assert n["heads"] == 2 * C + 7 * C + 7
    assert len(backbones) == 1, f"the backbone changes with the heads: {sorted(backbones)}"


def test_the_smoke_test_prints_the_breakdown():
    proc = subprocess.run([sys.executable, "-m", "ivmini.vit", "--batch", "1"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"preset tiny: ([\d.]+) M parameters = backbone ([\d.]+) M \+ heads ([\d.]+) M", proc.stdout)
    assert m, proc.stdout
    bare = VideoViT(vision_config("tiny", heads="none")).param_counts()["backbone"]
    assert m.group(2) == f"{bare / 1e6:.2f}"
    assert "width 3200 (final 768) and 1408" in proc.stdout      # the teacher widths the heads were built for
