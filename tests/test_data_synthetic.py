"""The synthetic world (ivmini/data/synthetic.py): determinism, a round trip from the decoded mp4s back to the
metadata (shape centres within a pixel, colours, motions, pitch, beep count), held-out splits, the annotation
formats (stage-2 stills included), atomic generation with its marker, and the CLI with its contact sheet."""
import csv
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import av
import numpy as np
import pytest

from ivmini.data import synthetic as S
from ivmini.data import synthetic_media as M
from ivmini.data.video import read_image

N, SIZE = 40, 64            # 40 clips: every held-out combination reaches val/test; ~1 s to generate
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return Path(S.generate(tmp_path_factory.mktemp("syn") / "world", n=N, size=SIZE, seed=0, workers=2))


def load(root, name):
    with open(Path(root) / "annotations" / name) as f:
        return json.load(f)


def all_metas(root):
    return [m for split in S.SPLITS for m in load(root, f"meta_{split}.json")]


def decode(path):
    """-> frames uint8 (T, H, W, 3), mono audio float32 (n,); PyAV directly, not the module's helper."""
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(path)) as c:
        assert (c.streams.audio[0].rate, c.streams.audio[0].channels) == (M.SR, 1)
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return frames, audio


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path):
    again = Path(S.generate(tmp_path / "again", n=N, size=SIZE, seed=0, workers=1))   # 1 worker vs. 2
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".mp4":
            a, b = decode(world / rel), decode(again / rel)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), rel
        assert (world / rel).read_bytes() == (again / rel).read_bytes(), rel      # mp4s too: x264 is deterministic
    other = Path(S.generate(tmp_path / "other", n=4, size=SIZE, seed=1, workers=1))
    assert load(other, "stage2_train.json") != load(world, "stage2_train.json")[:4]
    assert not np.array_equal(decode(other / "videos/000000.mp4")[0], decode(world / "videos/000000.mp4")[0])


# ----------------------------------------------------------------------------- round trip

def alpha(img, bg, rgb):
    """How much of colour rgb each pixel holds over the background: projection onto (rgb - bg), in [0, 1]."""
    d = rgb - bg
    return np.clip(((img - bg) * d).sum(-1) / (d * d).sum(-1), 0, 1)


def motion_of(cents, areas, alphas, k, n_phases):
    """Read phase k's motion from the pixels alone: centroid shift, area change, or shape change."""
    t0, t1 = int(np.ceil(k * (M.T - 1) / n_phases)), int((k + 1) * (M.T - 1) // n_phases)
    dx, dy = cents[t1] - cents[t0]
    if np.hypot(dx, dy) > 0.15 * SIZE:                      # a phase moves by 0.3 of the frame
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    if not 1 / 1.3 < areas[t1] / areas[t0] < 1.3:           # a phase scales the area by 1.6^2
        return "grow" if areas[t1] > areas[t0] else "shrink"
    changed = np.abs(alphas[(t0 + t1) // 2] - alphas[t0]).sum() / areas[t0]   # ~40 degrees into a rotation
    return "rotate" if changed > 0.12 else "static"


def recover(root, m):
    """Decode one clip and measure it -> (per object: centroids, colour, phases, max centre error), audio."""
    frames, audio = decode(root / m["video"])
    assert frames.shape == (M.T, SIZE, SIZE, 3)
    frames, bg = frames.astype(np.float64), M.background(m["background_seed"], SIZE)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    objects = []
    for o in m["objects"]:
        rgb, cents, areas, alphas, errs = np.array(o["rgb"], float), [], [], [], []
        for t, img in enumerate(frames):
            px, py = o["positions"][t]
            near = np.hypot(xx - px, yy - py) <= S.BOUND[o["shape"]] * o["radius_px"] * o["scales"][t] + 1.5
            a = alpha(img, bg, rgb) * near
            cents.append(np.array([(a * xx).sum(), (a * yy).sum()]) / a.sum())
            errs.append(np.hypot(*(cents[-1] - (px, py))))
            areas.append(a.sum())
            alphas.append(a)
        core = frames[0][alphas[0] > 0.9].mean(0)           # the solid inside of the shape in frame 0
        colour = min(S.COLOURS, key=lambda c: np.linalg.norm(core - S.COLOURS[c]))
        phases = [motion_of(np.array(cents), areas, alphas, k, len(m["phases"])) for k in range(len(m["phases"]))]
        objects.append({"colour": colour, "phases": phases, "err": max(errs)})
    return objects, audio


def beeps_in(x):
    """Onsets (s) of the bursts in x: 10 ms mean |x| above 0.1."""
    env = np.convolve(np.abs(x), np.ones(160) / 160, "same") > 0.1
    return np.flatnonzero(np.diff(env.astype(int)) == 1) / M.SR


def test_round_trip_pixels_and_sound(world):
    metas = all_metas(world)
    assert {m["sound"]["kind"] for m in metas} == set(S.SOUNDS)
    assert {p for m in metas for p in m["phases"]} == set(S.MOTIONS)
    for m in metas:
        objects, audio = recover(world, m)
        for o, got in zip(m["objects"], objects):
            assert got["err"] < 1.0, (m["id"], o, got)             # centre within a pixel in every frame
            assert got["colour"] == o["colour"], (m["id"], got)
            assert got["phases"] == m["phases"], (m["id"], m["caption"], got)
        snd = m["sound"]
        assert len(audio) >= M.SR * S.SECONDS                      # AAC adds a tail: trim to the length
        x = audio[:M.SR * S.SECONDS]
        power = np.abs(np.fft.rfft(x)) ** 2
        if snd["kind"] == "silence":
            assert np.abs(x).max() < 1e-3
        elif snd["kind"] == "noise":
            assert 0.05 < x.std() < 0.2 and power.max() < 0.01 * power.sum()     # broadband
        else:
            assert abs(np.argmax(power) * M.SR / len(x) - snd["pitch_hz"]) < 5
            assert snd["pitch"] == ("low" if m["objects"][0]["size"] == "large" else "high")
        if snd["kind"] == "beeps":
            onsets = beeps_in(x)
            assert len(onsets) == snd["beeps"], (m["id"], onsets, snd)
            assert np.abs(onsets - np.array(snd["onsets_s"])).max() < 0.015
        elif snd["kind"] != "noise":
            assert len(beeps_in(x)) == (1 if snd["kind"] == "tone" else 0)   # a tone is one long burst


# ----------------------------------------------------------------------------- splits

def combos_of(m):
    """The held-out combinations a clip contains, recomputed from its attributes (not from its 'held_out')."""
    found = set()
    for kind, colour, what in S.HELD_OUT:
        for o in m["objects"]:
            if o["colour"] == colour and (o["shape"] == what if kind == "colour-shape" else what in m["phases"]):
                found.add((kind, colour, what))
    return found


def test_splits_hold_out_combinations(world):
    metas = all_metas(world)
    specs = [S.sample_clip(0, i) for i in range(400)]              # the default world's content, no pixels
    for clips in (metas, specs):
        train = [c for c in clips if c["split"] == "train"]
        evals = [c for c in clips if c["split"] != "train"]
        assert train and all(not combos_of(c) for c in train)
        assert set().union(*map(combos_of, evals)) == set(S.HELD_OUT)    # each one appears in val or test
        assert all(bool(combos_of(c)) == c["novel"] for c in evals)
        assert {c["split"] for c in evals} == {"val", "test"}
        # held out are combinations, not attributes: each colour, shape and motion is seen in training
        assert {o["colour"] for c in train for o in c["objects"]} == set(S.COLOURS)
        assert {o["shape"] for c in train for o in c["objects"]} == set(S.SHAPES)
        assert {p for c in train for p in c["phases"]} == set(S.MOTIONS)
    assert [len([s for s in specs if s["split"] == k]) for k in S.SPLITS] == [280, 60, 60]


# ----------------------------------------------------------------------------- annotation files

def test_every_annotation_parses_and_points_at_a_video(world):
    assert load(world, "classes.json") == S.CLASSES and len(S.CLASSES) == len(S.MOTIONS)
    caption_re = re.compile(r"^[a-z]+( [a-z]+|,)*$")
    ids = []
    for split in S.SPLITS:
        metas = load(world, f"meta_{split}.json")
        videos = [m["video"] for m in metas]
        ids += [m["id"] for m in metas]
        assert all((world / v).is_file() and v == f"videos/{m['id']}.mp4" for v, m in zip(videos, metas))
        lines = (world / "annotations" / f"stage1_{split}.txt").read_text().splitlines()
        assert [ln.split(" ") for ln in lines] == [["synthetic", v, "2", "-1", "-1", str(m["label"])]
                                                   for v, m in zip(videos, metas)]
        with open(world / "annotations" / f"classify_{split}.csv") as f:
            assert list(csv.reader(f)) == [[v, str(m["label"])] for v, m in zip(videos, metas)]
        assert all(S.CLASSES[m["label"]] == m["label_name"] and S.MOTIONS[m["label"]] == m["phases"][0] for m in metas)
        stage2 = load(world, f"stage2_{split}.json")
        stage2, stills = stage2[:len(metas)], stage2[len(metas):]       # every clip, then every clip's still
        assert [r["video"] for r in stage2] == videos
        assert stills == [{"image": f"images/{m['id']}.png", "caption": m["image_caption"]} for m in metas]
        for r, m in zip(stills, metas):     # the still is the rendered frame (lossless), at the shapes' base size
            assert caption_re.match(r["caption"]) and "then" not in r["caption"], r
            assert r["caption"] == " and ".join(f"a {o['size']} {o['colour']} {o['shape']}" for o in m["objects"])
            assert all(abs(o["scales"][m["image_frame"]] - 1) < 0.05 for o in m["objects"]), m["phases"]
            still = S.render(S.sample_clip(0, int(m["id"])), SIZE)[m["image_frame"]]
            assert np.array_equal(read_image(world / r["image"])[0].numpy(), still), r
        for r, m in zip(stage2, metas):
            assert set(r) == {"video", "caption", "audio_caption", "av_caption"}
            assert all(caption_re.match(r[k]) for k in ("caption", "audio_caption", "av_caption")), r
            assert all(o["colour"] in r["caption"] and o["shape"] in r["caption"] for o in m["objects"])
            assert ("then" in r["caption"]) == (len(m["phases"]) == 2)
            assert r["av_caption"].startswith(r["caption"]) and r["audio_caption"] in r["av_caption"]
            assert (S.NUMBERS[m["sound"]["beeps"]] in r["audio_caption"]) == (m["sound"]["kind"] == "beeps")
        assert load(world, f"retrieval_{split}.json") == [
            {"video": v, **{k: r[k] for k in ("caption", "audio_caption", "av_caption")}} for v, r in zip(videos, stage2)]
        instruct = load(world, f"instruct_{split}.json")
        assert [r["video"] for r in instruct] == videos
        for r, m in zip(instruct, metas):
            types = [qa["type"] for qa in r["QA"]]
            assert types == ["colour", "shape", "motion"] + ["order"] * (len(m["phases"]) == 2) + ["beeps"]
            for qa in r["QA"]:
                assert {"i", "q", "a", "options", "answer_idx"} <= set(qa)
                assert len(qa["options"]) == len(set(qa["options"])) == 4 and qa["options"][qa["answer_idx"]] == qa["a"]
            if len(m["phases"]) == 2:          # both phases are offered: only the order tells them apart
                phrases = {S.MOTION_ANSWERS[S.MOTIONS.index(p)] for p in m["phases"]}
                assert all(phrases <= set(qa["options"]) for qa in r["QA"] if qa["type"] in ("motion", "order"))
    assert sorted(ids) == [f"{i:06d}" for i in range(N)]
    assert (world / "README.txt").read_text().startswith(f"ivmini synthetic world v{S.VERSION}: n={N} size={SIZE} seed=0")


# ----------------------------------------------------------------------------- atomic generation, cache

def test_interrupted_run_leaves_no_world_and_ensure_world_reuses(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(S, "write_annotations", interrupted)
    with pytest.raises(KeyboardInterrupt):
        S.generate(tmp_path / "w", n=2, size=32, workers=1)
    monkeypatch.undo()
    assert not (tmp_path / "w").exists()
    (leftover,) = tmp_path.glob("w.tmp-*")                           # the half world, under a name nobody reads
    assert any(leftover.rglob("*.mp4")) and not S.is_complete(leftover)

    monkeypatch.setenv("IVMINI_DATA", str(tmp_path / "cache"))
    assert S.default_root() == str(tmp_path / "cache")
    path = Path(S.ensure_world(n=2, size=32, seed=3, workers=1, progress=False))
    assert path == tmp_path / "cache" / f"world-n2-s32-seed3-v{S.VERSION}" and S.is_complete(path, 2, 32, 3)
    assert not S.is_complete(path, n=3) and not S.is_complete(path, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    monkeypatch.setattr(S, "generate", lambda *a, **k: pytest.fail("regenerated a complete world"))
    assert Path(S.ensure_world(n=2, size=32, seed=3)) == path
    assert stamps == {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    monkeypatch.undo()

    mine = tmp_path / "mine"                                         # never delete what is not a world
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        S.generate(mine, n=1, size=32, workers=1)
    assert (mine / "notes.txt").read_text() == "keep me"
    S.generate(path, n=1, size=32, workers=1)                         # a world is replaced as a whole
    assert S.is_complete(path, 1, 32, 0) and len(list((path / "videos").iterdir())) == 1


# ----------------------------------------------------------------------------- CLI and contact sheet

def read_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body)
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    w, h, depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour_type) == (8, 2) and b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 1).all()                                   # 'Sub' filter: undo with a running sum
    return (np.cumsum(rows[:, 1:].reshape(h, w, 3).astype(np.int64), axis=1) % 256).astype(np.uint8)


def test_cli_writes_world_and_contact_sheet(tmp_path):
    out, png = tmp_path / "cli", tmp_path / "sheet.png"
    cmd = [sys.executable, "-m", "ivmini.data.synthetic", "--out", str(out), "--n", "3", "--size", "32",
           "--workers", "1", "--contact-sheet", str(png)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert f"world: {out}" in r.stdout and f"contact sheet: {png}" in r.stdout
    assert S.is_complete(out, 3, 32, 0)
    sheet = read_png(png)
    assert sheet.shape == (3 * 34 - 2, 8 * 34 - 2, 3)                # 3 clips x 8 frames, 2 px gaps
    first = decode(out / "videos/000000.mp4")[0]
    assert np.array_equal(sheet[:32, :32], first[0]) and np.array_equal(sheet[:32, -32:], first[-1])
    shipped = REPO / "ivmini" / "data" / "synthetic_world.png"      # the README's picture
    assert shipped.stat().st_size < 300_000 and read_png(shipped).shape == (6 * 114 - 2, 8 * 114 - 2, 3)
