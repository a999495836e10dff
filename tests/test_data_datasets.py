"""Transforms, annotation formats, the dataset (robust loading, determinism), collate and sampler."""
import json
import os
import re

import av
import numpy as np
import pytest
import torch

import test_data_video as video_tests
from ivmini.data import transforms as T
from ivmini.data.datasets import (VideoDataset, collate, pre_text, read_classify_csv, read_eval_json,
                                  read_instruct_json, read_stage1_list, read_stage2_json)
from ivmini.data.sampling import ShardedSampler, make_loader


# ---------------------------------------------------------------------------------------------
# transforms

def test_multi_scale_crop_params_follow_the_tsn_rule(seed):
    rng = np.random.default_rng(seed)
    H, W, size = 120, 160, 112
    base = 120
    sides = [112 if abs(int(base * s) - 112) < 3 else int(base * s) for s in (1, .875, .75, .66)]
    allowed = {(sides[i], sides[j]) for i in range(4) for j in range(4) if abs(i - j) <= 1}   # (h, w)
    seen = set()
    for _ in range(400):
        top, left, h, w = T.multi_scale_crop_params(H, W, size, rng)
        assert (h, w) in allowed
        hs, ws = (H - h) // 4, (W - w) // 4
        assert (hs == 0 or top % hs == 0) and (ws == 0 or left % ws == 0)
        assert 0 <= top <= H - h and 0 <= left <= W - w
        seen.add((h, w))
    assert seen == allowed            # every allowed pair is drawn


def test_random_resized_crop_params(seed):
    rng = np.random.default_rng(seed)
    for _ in range(300):
        top, left, h, w = T.random_resized_crop_params(90, 160, rng)
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 160
        assert 0.5 * 90 * 160 * 0.9 <= h * w <= 90 * 160 + 1e-9
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_transform_outputs_and_normalisation(seed):
    rng = np.random.default_rng(seed)
    frames = torch.randint(0, 256, (4, 60, 80, 3), dtype=torch.uint8)
    for name in ("stage1", "stage2", "test"):
        x = T.get_transform(name)(frames, 32, rng)
        assert x.shape == (3, 4, 32, 32) and x.dtype == torch.float32
    # test transform: a plain square resize of a constant video is that constant, normalised
    const = torch.full((2, 50, 70, 3), 128, dtype=torch.uint8)
    x = T.test_transform(const, 24)
    want = (128 / 255 - torch.tensor(T.MEAN)) / torch.tensor(T.STD)
    torch.testing.assert_close(x[:, :, 5, 7], want[:, None].expand(3, 2))
    # the same frames at the target size pass through untouched (up to normalisation)
    same = torch.randint(0, 256, (2, 24, 24, 3), dtype=torch.uint8)
    back = T.test_transform(same, 24) * torch.tensor(T.STD).view(3, 1, 1, 1) + torch.tensor(T.MEAN).view(3, 1, 1, 1)
    torch.testing.assert_close(back * 255, same.permute(3, 0, 1, 2).float(), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="uint8 tensor"):
        T.stage1_train(frames.float(), 32, rng)
    with pytest.raises(KeyError, match="unknown transform"):
        T.get_transform("stage9")


def test_stage1_flip_follows_the_rng(seed):
    frames = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    frames[:, :, :16] = 255                                     # bright left half: every crop keeps some
    flipped = [T.stage1_train(frames, 32, np.random.default_rng(s))[0, 0, 16, 0] < 0 for s in range(40)]
    assert 5 < sum(flipped) < 35                                  # both outcomes occur
    never = [T.stage1_train(frames, 32, np.random.default_rng(s), flip=False)[0, 0, 16, 0] > 0 for s in range(10)]
    assert all(never)


# ---------------------------------------------------------------------------------------------
# annotation formats

def test_pre_text_matches_the_official_rule():
    assert pre_text("A man's <person> Jumps-over/the  fence!!  ") == "a mans person jumps over the fence"
    assert pre_text("One, two. Three", max_l=2) == "one two"
    with pytest.raises(TypeError):
        pre_text(3)


def test_annotation_formats(tmp_path):
    (tmp_path / "s1.txt").write_text("kinetics a/x.mp4 10.0 2.0 5.0 3\nssv2 b.mp4 -1 -1 -1 7\n\n")
    (tmp_path / "s1b.txt").write_text("c.mp4,4.0,-1,-1,1\n")
    recs = read_stage1_list(tmp_path / "s1.txt")
    assert [(r.path, r.label, r.start, r.end, r.source) for r in recs] == \
        [("a/x.mp4", 3, 2.0, 5.0, "kinetics"), ("b.mp4", 7, None, None, "ssv2")]
    assert read_stage1_list(tmp_path / "s1b.txt", sep=",")[0].path == "c.mp4"
    (tmp_path / "bad.txt").write_text("a.mp4 1 2\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_stage1_list(tmp_path / "bad.txt")

    s2 = [{"video": "v.mp4", "caption": "A Dog!", "audio_caption": "Barking.", "av_caption": "A dog barks."},
          {"image": "i.jpg", "captions": ["one", "Two"]}, {"video": "w.mp4", "caption": "x", "start": 1.5, "end": 3}]
    (tmp_path / "s2.json").write_text(json.dumps(s2))
    recs = read_stage2_json(tmp_path / "s2.json")
    assert recs[0].captions == {"caption": "a dog", "audio_caption": "barking", "av_caption": "a dog barks"}
    assert recs[1].media == "image" and recs[1].caption_list == ["one", "two"]
    assert (recs[2].start, recs[2].end) == (1.5, 3)
    (tmp_path / "e.json").write_text(json.dumps([{"video": "a.mp4", "caption": ["X y", "z"]}, {"video": "b", "caption": "Q"}]))
    assert [r.caption_list for r in read_eval_json(tmp_path / "e.json")] == [["x y", "z"], ["q"]]
    (tmp_path / "c.csv").write_text("a.mp4,3\nb c.mp4,0\n")
    assert [(r.path, r.label) for r in read_classify_csv(tmp_path / "c.csv")] == [("a.mp4", 3), ("b c.mp4", 0)]
    (tmp_path / "i.json").write_text(json.dumps([{"video": "a.mp4", "QA": [{"i": "", "q": "what?", "a": "red"}]}]))
    assert read_instruct_json(tmp_path / "i.json")[0].qa[0]["a"] == "red"
    (tmp_path / "bad.json").write_text(json.dumps({"video": "a"}))
    with pytest.raises(ValueError, match="JSON list"):
        read_eval_json(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------
# the dataset: robust loading, determinism

def write_clip(path, n=16, size=32, value=None, fps=8):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.options = {"threads": "1"}
        for i in range(n):
            img = np.full((size, size, 3), value if value is not None else (i * 13) % 256, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture
def clip_dir(tmp_path):
    for i in range(6):
        write_clip(tmp_path / f"v{i}.mp4", value=40 * i)
    (tmp_path / "empty.mp4").write_bytes(b"")
    data = (tmp_path / "v0.mp4").read_bytes()
    (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.mp4").write_text("not a video")
    return tmp_path


def test_dataset_samples_are_deterministic_and_shaped(clip_dir, seed):
    from ivmini.data.datasets import Record
    recs = [Record(f"v{i}.mp4", label=i, caption_list=[f"clip {i}", f"video {i}"]) for i in range(6)]
    ds = VideoDataset(recs, str(clip_dir), num_frames=4, size=16, transform="stage2", seed=seed)
    a, b = ds[3], ds[3]
    assert a["video"].shape == (3, 4, 16, 16) and a["label"] == 3 and a["skipped"] == []
    assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]["video"], VideoDataset(recs, str(clip_dir), num_frames=4, size=16,
                                                           transform="stage2", seed=seed)[i]["video"]) for i in range(6))
    batch = collate([ds[i] for i in range(3)])
    assert batch["video"].shape == (3, 3, 4, 16, 16) and batch["label"].tolist() == [0, 1, 2]


def test_audio_of_videos_silent_clips_flagged_images_without(clip_dir, world, seed):
    """audio=True: a video with sound gives its features and has_audio=True; a video without an audio stream
    gives the features of silence as long as the clip and has_audio=False (not a skip); an image gets no audio."""
    from ivmini.data.audio import audio_features, read_audio
    from ivmini.data.datasets import Record
    recs = [Record(os.path.join(world, "videos/000000.mp4"), caption_list=["x"]), Record("v1.mp4", caption_list=["y"]),
            Record(os.path.join(world, "images/000000.png"), media="image", caption_list=["z"])]
    ds = VideoDataset(recs, str(clip_dir), num_frames=4, size=16, transform="test", sample="middle", audio=True,
                      seed=seed)
    sound, silent, image = ds[0], ds[1], ds[2]
    assert sound["has_audio"] is True and silent["has_audio"] is False
    assert torch.equal(sound["audio"], audio_features(read_audio(recs[0].path)))
    assert sound["skipped"] == [] and silent["skipped"] == []
    seconds = 16 / 8                                                   # write_clip: 16 frames at 8 fps
    assert torch.equal(silent["audio"], audio_features(torch.zeros(round(seconds * 16000))))
    assert not torch.equal(silent["audio"], sound["audio"])
    assert "audio" not in image and "has_audio" not in image
    batch = collate([sound, silent])
    assert batch["audio"].shape == (2, 998, 64) and batch["has_audio"].tolist() == [True, False]


def test_broken_files_are_skipped_with_their_reasons(clip_dir, seed):
    from ivmini.data.datasets import DataError, Record
    img, not_videos = video_tests.not_videos(clip_dir, seed)
    os.mkfifo(clip_dir / "fifo.mp4")
    (clip_dir / "folder.mp4").mkdir()
    bad = {"missing.mp4": "cannot open", "empty.mp4": "cannot open", "trunc.mp4": "cannot open",
           "text.mp4": "cannot open", "fifo.mp4": "is a FIFO", "folder.mp4": "is a directory",
           **{os.path.basename(path): reason for path, reason in not_videos.values()}}
    recs = [Record(p) for p in bad] + [Record(f"v{i}.mp4", label=i) for i in range(6)]
    recs.append(Record("still.png", media="image"))
    ds = VideoDataset(recs, str(clip_dir), num_frames=4, size=16, transform="test", sample="middle")
    with video_tests.unblocked_fifo(clip_dir / "fifo.mp4") as opened:
        s = ds[0]                               # replaced by the next decodable sample
    assert not opened, "the FIFO was opened"
    assert s["path"] == "v0.mp4" and [p for p, _ in s["skipped"]] == list(bad)
    for (path, reason), want in zip(s["skipped"], bad.values()):
        assert re.search(want, reason), (path, reason)
    image = ds[len(recs) - 1]                   # a picture in an image record is an image
    assert image["path"] == "still.png" and image["skipped"] == [] and image["video"].shape == (3, 1, 16, 16)
    torch.testing.assert_close(image["video"], T.test_transform(torch.from_numpy(img)[None], 16))
    # nothing decodable: every record is tried once, then an error naming examples (no endless retry)
    with pytest.raises(DataError, match=r"none of the 3 samples .*missing.mp4: cannot open.*is a text file"):
        VideoDataset([Record(p) for p in ("missing.mp4", "empty.mp4", "notes.txt")], str(clip_dir), num_frames=4,
                     size=16)[0]
    # the time limit of each read
    slow = VideoDataset(recs[-7:-6] + recs[-6:-5], str(clip_dir), num_frames=4, size=16, timeout=1e-6)
    with pytest.raises(DataError, match="v0.mp4: reading took longer than the time limit of 1e-06 s"):
        slow[0]


def test_skipped_pairs_through_collate_and_workers(clip_dir):
    from ivmini.data.datasets import Record
    paths = ["v0.mp4", "empty.mp4", "v1.mp4", "v2.mp4", "missing.mp4", "text.mp4", "v3.mp4", "v4.mp4", "v5.mp4"]
    ds = VideoDataset([Record(p) for p in paths], str(clip_dir), num_frames=2, size=16, transform="test")
    for workers in (0, 2):
        batches = list(make_loader(ds, 3, ShardedSampler(len(paths), shuffle=False), num_workers=workers))
        # index 1 -> v1 after empty.mp4; index 4 -> v3 after missing.mp4 and text.mp4; index 5 -> v3 after text.mp4
        assert [b["path"] for b in batches] == [["v0.mp4", "v1.mp4", "v1.mp4"], ["v2.mp4", "v3.mp4", "v3.mp4"],
                                                ["v3.mp4", "v4.mp4", "v5.mp4"]]
        skipped = [[(p, r.split(":")[0]) for p, r in b["skipped"]] for b in batches]
        assert skipped == [[("empty.mp4", "cannot open")],
                           [("missing.mp4", "cannot open"), ("text.mp4", "cannot open"), ("text.mp4", "cannot open")],
                           []], workers
        assert all(type(pair) is tuple for b in batches for pair in b["skipped"])


def test_decode_failures_rule_and_message():
    from ivmini.data.datasets import DataError, DecodeFailures
    f = DecodeFailures(max_fraction=0.01, grace=3)
    f.add(64, 3, [("a.mp4", "cannot open: x"), ["b.mp4", "is a FIFO (named pipe), not a regular file"],
                  ("a.mp4", "again")])              # pairs may come back from a pinning loader as 2-lists
    f.check()                                        # 3 of 64 = 4.7 %, but within the grace
    f.add(335, 1, [("c.mp4", "holds a single frame")])
    with pytest.raises(DataError, match=r"^4 of 399 samples drawn \(1.00 %\) could not be decoded, more than the "
                                        r"allowed 1 %.*Examples: a.mp4: cannot open: x; b.mp4: is a FIFO.*; c.mp4"):
        f.check()                                    # 4 > 0.01 * 399 and 4 > 3
    f.add(1, 0)
    f.check()                                        # 4 of 400: not more than 1 %
    assert f.state() == {"drawn": 400, "failed": 4}
    # resumed from a checkpoint; summed counts of other ranks carry no examples of this one
    g = DecodeFailures(max_fraction=0.5, grace=0, **f.state(), max_examples=2)
    g.add(10, 400, [(f"{i}.mp4", "r") for i in range(5)])
    with pytest.raises(DataError, match=r"404 of 410 .*98.54 %.*allowed 50 %.*Examples: 0.mp4: r; 1.mp4: r$"):
        g.check()
    with pytest.raises(DataError, match="none on this rank"):
        DecodeFailures(grace=0, failed=1, drawn=1).check()


# ---------------------------------------------------------------------------------------------
# annotation files: the usual mix-ups get messages naming the file

READERS = [read_stage1_list, read_stage2_json, read_eval_json, read_classify_csv, read_instruct_json]


@pytest.mark.parametrize("read", READERS, ids=lambda r: r.__name__)
def test_annotation_file_mistakes(tmp_path, read):
    with pytest.raises(ValueError, match=f"{tmp_path} is a directory, not an annotation file: pass the list "
                                         "with --data and the videos' folder with --data-root"):
        read(tmp_path)
    clip = tmp_path / "v.mp4"
    write_clip(clip, n=2)
    noise = tmp_path / "list.txt"
    noise.write_bytes(np.random.default_rng(0).integers(1, 256, 3000, dtype=np.uint8).tobytes())  # no NUL, not UTF-8
    for path in (clip, noise):
        with pytest.raises(ValueError, match=f"{path} looks like a video .binary data., not an annotation list: "
                                             "pass the list with --data and the videos' folder with --data-root"):
            read(path)
    empty = tmp_path / "empty.list"
    for text in ("", "\n\n") + (() if read in (read_stage1_list, read_classify_csv) else ("[]",)):
        empty.write_text(text)
        with pytest.raises(ValueError, match=f"^{empty} holds no samples$"):
            read(empty)
    with pytest.raises(FileNotFoundError, match=f"annotation file {tmp_path / 'nope.txt'} does not exist"):
        read(tmp_path / "nope.txt")


def test_annotation_text_is_utf8_and_json_errors_name_the_file(tmp_path):
    # a multi-byte character across the 4 kB boundary of the text check is still text
    caption = "x" * 4095 + "é"
    (tmp_path / "e.json").write_text(json.dumps([{"video": "a.mp4", "caption": caption}], ensure_ascii=False),
                                     encoding="utf-8")
    assert read_eval_json(tmp_path / "e.json")[0].caption_list == [caption]
    (tmp_path / "bad.json").write_text("[{\"video\": ")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_eval_json(tmp_path / "bad.json")


def test_sampler_shards_and_resumes():
    full = []
    for rank in range(3):
        s = ShardedSampler(10, rank=rank, world_size=3, seed=5)
        s.set_epoch(2)
        full.append(list(s))
        assert len(s) == 4
    assert sorted(i for part in full for i in part)[:10] != [] and set(i for p in full for i in p) == set(range(10))
    s = ShardedSampler(10, rank=1, world_size=3, seed=5)
    s.set_epoch(2, start=2)
    assert list(s) == full[1][2:] and len(s) == 2
    other = ShardedSampler(10, seed=5)
    other.set_epoch(3)
    assert list(other) != list(ShardedSampler(10, seed=5))


def test_loader_with_workers(clip_dir):
    from ivmini.data.datasets import Record
    recs = [Record(f"v{i}.mp4", label=i) for i in range(6)]
    ds = VideoDataset(recs, str(clip_dir), num_frames=4, size=16, transform="stage1")
    sampler = ShardedSampler(6, shuffle=False)
    batches = list(make_loader(ds, 3, sampler, num_workers=2))
    assert [b["label"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
    again = list(make_loader(ds, 3, sampler, num_workers=0))
    assert torch.equal(batches[1]["video"], again[1]["video"])   # workers do not change a sample
