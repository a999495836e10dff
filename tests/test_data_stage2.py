"""Stage-2 data (ivmini/data/datasets.py, synthetic.py): MediaBatchSampler (one media type per batch, ranks
disjoint and in step, exact resume), skip-to-next within a media type, image samples (3, 1, S, S), caption
errors of the stage-2 JSON, and the synthetic world's mixed video/still annotation through a DataLoader.

    python -m pytest tests/test_data_stage2.py -q        (~5 s)
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ivmini.data import synthetic as S
from ivmini.data.datasets import DataError, Record, VideoDataset, read_stage2_json
from ivmini.data.sampling import MediaBatchSampler, ShardedSampler, make_loader

SIZE = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """4 clips at 32 px, all in train (clip i is train when i % 20 < 14); each also has its still."""
    return Path(S.generate(tmp_path_factory.mktemp("syn") / "world", n=4, size=SIZE, seed=0, workers=1))


def mixed_media(seed, n=60):
    rng = np.random.default_rng(seed)
    return [["video", "image"][k] for k in rng.integers(0, 2, n)]


def epoch_batches(media, batch_size, world, epoch, seed, accum=1, start=0):
    """-> per rank: its list of batches for the epoch."""
    out = []
    for rank in range(world):
        s = MediaBatchSampler(media, batch_size, rank, world, seed=seed, accum=accum)
        s.set_epoch(epoch, start=start)
        assert len(s) == s.num_batches - start
        out.append(list(s))
    return out


# ----------------------------------------------------------------------------- MediaBatchSampler

@pytest.mark.parametrize("world,batch_size,accum", [(1, 4, 1), (2, 3, 1), (3, 2, 1), (2, 2, 3)])
def test_media_batches_are_homogeneous_disjoint_and_in_step(seed, world, batch_size, accum):
    media = mixed_media(seed)
    ranks = epoch_batches(media, batch_size, world, epoch=2, seed=seed, accum=accum)
    types = [[media[b[0]] for b in batches] for batches in ranks]
    assert all(t == types[0] for t in types)                        # same type order on every rank
    for batches in ranks:
        assert all(len(b) == batch_size and len({media[i] for i in b}) == 1 for b in batches)
        assert all(isinstance(i, int) for b in batches for i in b)
    drawn = [i for batches in ranks for b in batches for i in b]
    assert len(drawn) == len(set(drawn))                             # at most once per epoch, across ranks too
    for kind in ("video", "image"):                                  # only the remainder of each type is dropped
        n, step = media.count(kind), batch_size * world * accum
        assert types[0].count(kind) == n // step * accum
        assert n - sum(media[i] == kind for i in drawn) < step
    steps = [types[0][k:k + accum] for k in range(0, len(types[0]), accum)]
    assert all(len(set(s)) == 1 for s in steps)                       # the micro-batches of a step share a type
    # shuffled, not all videos then all images: over 12 epochs the step orders are not all the same (with 4
    # steps of which 1 is a video, all alike has p = 4 x 4^-12 ~ 2e-7; one epoch alone is often sorted)
    orders = {tuple(media[b[0]] for b in epoch_batches(media, batch_size, 1, e, seed, accum=accum)[0])
              for e in range(12)}
    assert len(orders) > 1, orders


def test_media_batches_resume_and_change_with_the_epoch(seed):
    media = mixed_media(seed, 50)
    full = epoch_batches(media, 2, 3, epoch=1, seed=seed)
    for start in (0, 1, 5, len(full[0])):
        assert epoch_batches(media, 2, 3, epoch=1, seed=seed, start=start) == [b[start:] for b in full]
    other = epoch_batches(media, 2, 3, epoch=2, seed=seed)
    assert other != full and len(other[0]) == len(full[0])          # same count each epoch, other batches
    assert [[media[b[0]] for b in r] for r in other] != [[media[b[0]] for b in r] for r in full]
    assert epoch_batches(media, 2, 3, epoch=1, seed=seed + 1) != full
    sampler = MediaBatchSampler(media, 2, 0, 3)
    with pytest.raises(ValueError, match="start 99 is outside the epoch's"):
        sampler.set_epoch(0, start=99)
    with pytest.raises(ValueError, match="rank 3 is not in"):
        MediaBatchSampler(media, 2, 3, 3)
    with pytest.raises(ValueError, match="2 image, 3 video over 2 ranks cannot fill one step of 1 x 2"):
        MediaBatchSampler(["video"] * 3 + ["image"] * 2, 2, 0, 2)


def test_a_type_too_small_for_a_step_is_left_out_with_a_warning(caplog):
    media = ["video"] * 8 + ["image"]
    with caplog.at_level("WARNING", logger="ivmini.data"):
        s = MediaBatchSampler(media, 2, 0, 2)
    assert "the 1 image samples cannot fill one step" in caplog.text
    assert s.num_batches == 2 and all(media[i] == "video" for b in s for i in b)


# ----------------------------------------------------------------------------- the dataset

def test_corrupt_media_are_replaced_within_their_type(world, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(world, root)
    (root / "bad.mp4").write_bytes(b"")
    png = (root / "images/000000.png").read_bytes()
    (root / "bad.png").write_bytes(png[:len(png) // 3])             # a truncated picture
    recs = [Record("bad.mp4"), Record("images/000001.png", media="image"), Record("videos/000002.mp4"),
            Record("bad.png", media="image"), Record("videos/000003.mp4"), Record("images/000000.png", media="image")]
    ds = VideoDataset(recs, str(root), num_frames=4, size=SIZE, transform="stage2", flip=False)
    v = ds[0]                                   # the next record is an image: skipped over, not taken
    assert v["path"] == "videos/000002.mp4" and v["video"].shape == (3, 4, SIZE, SIZE)
    assert [p for p, _ in v["skipped"]] == ["bad.mp4"]
    i = ds[3]                                   # the next record is a video: the image after it replaces
    assert i["path"] == "images/000000.png" and i["video"].shape == (3, 1, SIZE, SIZE)
    assert [p for p, _ in i["skipped"]] == ["bad.png"] and "decoding failed" in i["skipped"][0][1]
    # through the loader: a batch sampler that puts both broken records into batches of their type
    sampler = MediaBatchSampler([r.media for r in recs], 2, seed=0)
    shapes = {b["video"].shape for b in make_loader(ds, batch_sampler=sampler)}
    assert shapes == {(2, 3, 4, SIZE, SIZE), (2, 3, 1, SIZE, SIZE)}
    # no image decodes: an error for the images, although the videos are fine; each image tried once
    only_bad = VideoDataset([Record("bad.png", media="image"), Record("videos/000002.mp4"),
                             Record("missing.png", media="image")], str(root), num_frames=4, size=SIZE)
    with pytest.raises(DataError, match=r"none of the 2 samples of media type 'image' .*bad.png.*missing.png"):
        only_bad[0]


def test_image_samples_and_their_captions(world, seed):
    recs = [Record("images/000001.png", media="image", caption_list=["one", "two", "three"]),
            Record("images/000002.png", media="image", captions={"caption": "still"})]
    ds = VideoDataset(recs, str(world), num_frames=4, size=24, transform="stage2", flip=False, seed=seed)
    a = ds[0]
    assert a["video"].shape == (3, 1, 24, 24) and a["video"].dtype == torch.float32
    assert torch.equal(a["video"], ds[0]["video"]) and a["caption"] == ds[0]["caption"]   # seeded per sample
    assert ds[1]["caption"] == "still" and ds[1]["captions"] == {"caption": "still"}
    seen, crops = set(), set()
    for epoch in range(30):                    # a caption drawn uniformly per epoch, a new crop per epoch
        ds.set_epoch(epoch)
        s = ds[0]
        seen.add(s["caption"])
        crops.add(s["video"].sum().item())
    assert seen == {"one", "two", "three"} and len(crops) > 20


def test_stage2_json_errors_name_the_file_and_the_entry(tmp_path):
    cases = {"has no caption": {"image": "a.png", "note": "x"},
             "'captions' must be a list of strings": {"video": "a.mp4", "captions": "one caption"},
             "caption keys must hold a string": {"video": "a.mp4", "caption": ["a", "b"]},
             "has neither 'video' nor 'image'": {"audio": "a.wav", "caption": "x"}}
    path = tmp_path / "s2.json"
    for message, bad in cases.items():
        path.write_text(json.dumps([{"video": "ok.mp4", "caption": "fine"}, {"image": "b.png", "caption": "ok"}, bad]))
        with pytest.raises(ValueError, match=f"^{path}: entry 2: {message}"):
            read_stage2_json(path)


# ----------------------------------------------------------------------------- the synthetic world

def test_world_stage2_json_gives_videos_and_stills_in_homogeneous_batches(world):
    recs = read_stage2_json(world / "annotations" / "stage2_train.json")
    assert [r.media for r in recs] == ["video"] * 4 + ["image"] * 4
    metas = json.loads((world / "annotations" / "meta_train.json").read_text())
    assert [r.captions for r in recs[4:]] == [{"caption": m["image_caption"]} for m in metas]
    ds = VideoDataset(recs, str(world), num_frames=4, size=SIZE, transform="stage2", flip=False)
    sampler = MediaBatchSampler([r.media for r in recs], 1, seed=3)
    batches = list(make_loader(ds, batch_sampler=sampler, num_workers=0))
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(8))
    for b in batches:
        t = 4 if recs[b["index"][0]].media == "video" else 1
        assert b["video"].shape == (1, 3, t, SIZE, SIZE) and b["skipped"] == []
    with pytest.raises(ValueError, match="either batch_size and sampler, or batch_sampler"):
        make_loader(ds, 2, ShardedSampler(8), batch_sampler=sampler)
