"""Tests of ivmini/data/shards.py: webdataset tar shards written from every annotation format read back to the
same records and media bytes; shard sizes by count and by bytes; resume after an interrupted write; verify's
errors; truncated shards; tars of other webdataset tools. A 12-clip 32-px synthetic world keeps it fast.

    python -m pytest tests/test_shards.py -q
"""
import dataclasses
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from ivmini.data import shards, synthetic
from ivmini.data.audio import audio_features, read_audio
from ivmini.data.datasets import READERS
from ivmini.data.shards import ShardError, iter_shard, read_index, record_of, verify, write_shards


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("w") / "world"), n=12, size=32, seed=3, workers=1)


def ann(world, name):
    return os.path.join(world, "annotations", name)


def read_all(folder):
    """(Record, media bytes) of every sample, shards in index order."""
    index = read_index(folder)
    return [record_of(s) for sh in index["shards"] for s in iter_shard(os.path.join(folder, sh["name"]))]


# the retrieval file has string captions: detected as stage-2 (which keeps every caption key), eval when asked
@pytest.mark.parametrize("name, fmt, detected", [
    ("stage1_train.txt", "stage1", "stage1"), ("stage2_train.json", "stage2", "stage2"),
    ("retrieval_train.json", "eval", "stage2"), ("classify_train.csv", "classify", "classify"),
    ("instruct_train.json", "instruct", "instruct")])
def test_write_read_gives_the_records_and_bytes(tiny, tmp_path, name, fmt, detected):
    assert shards.detect_format(ann(tiny, name)) == detected
    index = write_shards(ann(tiny, name), tiny, str(tmp_path), "5", fmt=fmt)
    records = READERS[fmt](ann(tiny, name))
    got = read_all(str(tmp_path))
    assert [r for r, _ in got] == records                   # every field, in order, each once
    for rec, media in got:
        with open(os.path.join(tiny, rec.path), "rb") as f:
            assert media == f.read()
    assert index["total"] == len(records) and index["complete"] and not index["skipped"]
    assert {r.media for r in records} == ({"video", "image"} if fmt == "stage2" else {"video"})
    assert verify(str(tmp_path)) == []


def test_shard_size_by_count_and_by_bytes(tiny, tmp_path):
    data = ann(tiny, "stage2_train.json")                     # 12 videos + 12 stills
    index = write_shards(data, tiny, str(tmp_path / "count"), "5")
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 4]
    assert [s["records"] for s in index["shards"]] == [[0, 5], [5, 10], [10, 15], [15, 20], [20, 24]]
    # bytes: greedy, a shard takes samples while their tar bytes stay within the limit
    sizes = {}                                                # key -> tar bytes of its members
    for sh in index["shards"]:
        with tarfile.open(tmp_path / "count" / sh["name"]) as tar:
            for m in tar.getmembers():
                key = shards.split_name(m.name)[0]
                sizes[key] = sizes.get(key, 0) + 512 + -(-m.size // 512) * 512
    sizes = [sizes[k] for k in sorted(sizes)]
    limit = 3 * max(sizes) // 2
    index = write_shards(data, tiny, str(tmp_path / "bytes"), f"{limit}B")
    counts, i = [], 0
    while i < len(sizes):
        n, total = 0, 0
        while i + n < len(sizes) and (n == 0 or total + sizes[i + n] <= limit):
            total, n = total + sizes[i + n], n + 1
        counts.append(n)
        i += n
    assert [s["samples"] for s in index["shards"]] == counts and len(counts) > 2
    for s in index["shards"]:   # the file adds the end-of-archive blocks and tar's padding to 10 kB records
        assert s["bytes"] <= limit + 10240 + 1024
    assert [r for r, _ in read_all(str(tmp_path / "bytes"))] == READERS["stage2"](data)


def test_parse_shard_size():
    assert shards.parse_shard_size("1GB") == ("bytes", 10**9)
    assert shards.parse_shard_size("500MB") == ("bytes", 500 * 10**6)
    assert shards.parse_shard_size("2GiB") == ("bytes", 2 * 2**30)
    assert shards.parse_shard_size("1000") == ("samples", 1000)
    for bad in ("0", "1.5", "12XB", "", "-3"):
        with pytest.raises(ValueError, match="--shard-size"):
            shards.parse_shard_size(bad)


def test_resume_after_an_interrupted_write_equals_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    data, whole, cut = ann(tiny, "stage2_train.json"), str(tmp_path / "whole"), str(tmp_path / "cut")
    expected = write_shards(data, tiny, whole, "4")
    calls, add = [0], shards.add_sample

    def crash_in_shard_3(tar, members):                       # after 2 full shards and 1 sample of the third
        calls[0] += 1
        if calls[0] == 10:
            raise KeyboardInterrupt("simulated interruption")
        add(tar, members)

    monkeypatch.setattr(shards, "add_sample", crash_in_shard_3)
    with pytest.raises(KeyboardInterrupt):
        write_shards(data, tiny, cut, "4")
    partial = read_index(cut)
    assert [s["name"] for s in partial["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert not partial["complete"] and os.path.exists(os.path.join(cut, "shard-000002.tar.tmp"))
    assert any("did not finish" in p for p in verify(cut))
    monkeypatch.setattr(shards, "add_sample", add)
    resumed = write_shards(data, tiny, cut, "4")
    assert resumed == expected                                # names, counts, bytes, sha256, ranges
    assert sorted(os.listdir(cut)) == sorted(os.listdir(whole))
    assert verify(cut) == []
    assert write_shards(data, tiny, cut, "4") == expected    # a finished write run again changes nothing
    with pytest.raises(ShardError, match="--overwrite"):
        write_shards(data, tiny, cut, "5")
    assert write_shards(data, tiny, cut, "5", overwrite=True)["total"] == expected["total"]
    assert sorted(n for n in os.listdir(cut) if n.endswith(".tar")) == [shards.shard_name(i) for i in range(5)]


def test_unreadable_inputs_are_skipped_and_listed(tiny, tmp_path, capsys):
    lines = open(ann(tiny, "stage1_train.txt")).read().splitlines()[:3]
    lines.insert(1, "synthetic videos/missing.mp4 2 -1 -1 0")
    lines.append("synthetic videos 2 -1 -1 0")                # a directory
    data = tmp_path / "list.txt"
    data.write_text("\n".join(lines) + "\n")
    assert shards.main(["write", "--data", str(data), "--root", tiny, "--out", str(tmp_path / "s"),
                        "--shard-size", "2"]) == 0
    assert "3 samples in 2 shards; 2 skipped" in capsys.readouterr().out
    index = read_index(str(tmp_path / "s"))
    assert index["total"] == 3
    assert [(s["index"], s["path"]) for s in index["skipped"]] == [(1, "videos/missing.mp4"), (4, "videos")]
    assert "No such file" in index["skipped"][0]["reason"] and "not a regular file" in index["skipped"][1]["reason"]
    assert [s["records"] for s in index["shards"]] == [[0, 3], [3, 5]]
    assert [s["key"] for sh in index["shards"] for s in iter_shard(tmp_path / "s" / sh["name"])] == \
           ["000000000", "000000002", "000000003"]


def test_fbank_members(tiny, tmp_path):
    data = tmp_path / "list.txt"
    data.write_text("".join(open(ann(tiny, "stage1_train.txt")).readlines()[:2]))
    index = write_shards(str(data), tiny, str(tmp_path / "s"), "10", fbank=True)
    samples = list(iter_shard(tmp_path / "s" / index["shards"][0]["name"]))
    for s in samples:
        rec, _ = record_of(s)
        feats = np.load(io.BytesIO(s["fbank.npy"]))
        assert feats.shape == (998, 64) and feats.dtype == np.float32
        np.testing.assert_array_equal(feats, audio_features(read_audio(os.path.join(tiny, rec.path))).numpy())


@pytest.fixture
def good(tiny, tmp_path):
    folder = str(tmp_path / "good")
    write_shards(ann(tiny, "stage2_train.json"), tiny, folder, "8")
    return folder


def test_verify_names_the_broken_shard(good, tmp_path):
    assert verify(good) == [] and shards.main(["verify", good]) == 0
    flipped = shutil.copytree(good, tmp_path / "flip")
    with open(flipped / "shard-000001.tar", "r+b") as f:
        f.seek(3000)
        byte = f.read(1)
        f.seek(3000)
        f.write(bytes([byte[0] ^ 1]))
    problems = verify(str(flipped))
    assert problems and all("shard-000001.tar" in p for p in problems) and "sha256" in problems[0]
    assert shards.main(["verify", str(flipped)]) == 1

    missing = shutil.copytree(good, tmp_path / "missing")
    os.remove(missing / "shard-000002.tar")
    assert verify(str(missing)) == [f"{missing / 'index.json'}: shard shard-000002.tar is listed but missing "
                                    f"from {missing}"]

    extra = shutil.copytree(good, tmp_path / "extra")
    shutil.copy(extra / "shard-000000.tar", extra / "shard-000007.tar")
    assert verify(str(extra)) == [f"shard-000007.tar: a .tar in {extra} that the index does not list"]

    # a sample without its media member: rewrite shard 1 without one .mp4 and give the index its new checksum
    lacking = shutil.copytree(good, tmp_path / "lacking")
    path = lacking / "shard-000001.tar"
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "000000009.mp4"]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            tar.addfile(*shards._member(name, data))
    index = json.load(open(lacking / "index.json"))
    index["shards"][1].update(bytes=os.path.getsize(path), sha256=shards.sha256_of(path))
    json.dump(index, open(lacking / "index.json", "w"))
    problems = verify(str(lacking))
    assert len(problems) == 1 and "shard-000001.tar" in problems[0] and "lacks its media member .mp4" in problems[0]


def test_a_truncated_shard_yields_its_complete_samples_then_raises(good, tmp_path):
    whole = list(iter_shard(os.path.join(good, "shard-000000.tar")))
    data = open(os.path.join(good, "shard-000000.tar"), "rb").read()
    cut_at = len(data) // 2
    (tmp_path / "cut.tar").write_bytes(data[:cut_at])
    got = []
    with pytest.raises(ShardError, match="cut.tar: truncated or corrupt after"):
        for s in iter_shard(tmp_path / "cut.tar"):
            got.append(s)
    assert 0 < len(got) < len(whole) and got == whole[:len(got)]
    # cut exactly at a member boundary: tarfile alone would end quietly there; the missing end block tells
    with tarfile.open(os.path.join(good, "shard-000000.tar")) as tar:
        boundary = tar.getmembers()[4].offset                 # the header of sample 2's json
    (tmp_path / "cut.tar").write_bytes(data[:boundary])
    got = []
    with pytest.raises(ShardError, match="no end-of-archive block"):
        for s in iter_shard(tmp_path / "cut.tar"):
            got.append(s)
    assert [s["key"] for s in got] == [whole[0]["key"]]      # sample 1 may have had more members: not yielded


def test_tars_of_other_tools_read(tiny, tmp_path):
    """Members in another order within a sample, directory keys, extra members, directories, names without an
    extension, the media type taken from the member when the json has no path."""
    video = open(os.path.join(tiny, "videos", sorted(os.listdir(os.path.join(tiny, "videos")))[0]), "rb").read()
    labels = {"label": 3, "captions": {"caption": "a red square"}}
    members = [("a/b/000017.cls", b"3"), ("a/b/000017.mp4", video), ("a/b/000017.json", json.dumps(labels).encode()),
               ("a/b/000018.json", json.dumps({"path": "x/y.png", "media": "image"}).encode()),
               ("a/b/000018.txt", b"a still"), ("a/b/000018.png", b"\x89PNG not really"), ("README", b"no ext")]
    path = tmp_path / "foreign.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        d = tarfile.TarInfo("a/b")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(iter_shard(path))
    assert [s["key"] for s in samples] == ["a/b/000017", "a/b/000018"]
    assert sorted(samples[0]) == ["cls", "json", "key", "mp4"] and samples[0]["json"] == labels
    rec, media = record_of(samples[0])
    assert media == video and rec.path == "a/b/000017.mp4" and rec.media == "video" and rec.label == 3
    assert rec.captions == {"caption": "a red square"}
    rec, media = record_of(samples[1])
    assert (rec.path, rec.media, media) == ("x/y.png", "image", b"\x89PNG not really")
    with pytest.raises(ShardError, match="no .json annotation member"):
        record_of({"key": "k", "mp4": b""})
    with pytest.raises(ShardError, match=r"fields \['colour'\]"):
        record_of({"key": "k", "mp4": b"", "json": {"colour": "red"}})
    with pytest.raises(ShardError, match="expected one media member"):
        record_of({"key": "k", "mp4": b"", "webm": b"", "json": {}})
    assert dataclasses.asdict(record_of({"key": "k", "webm": b"", "json": {}})[0])["path"] == "k.webm"


def test_read_index_errors(good, tmp_path):
    with pytest.raises(ShardError, match="cannot read the shard index"):
        read_index(str(tmp_path))
    (tmp_path / "index.json").write_text(json.dumps({"format": "webdataset", "version": 99}))
    with pytest.raises(ShardError, match="not a version-1 webdataset index"):
        read_index(str(tmp_path / "index.json"))
    with pytest.raises(ValueError, match="pass --format"):
        shards.detect_format(str(tmp_path / "list.tsv"))
    assert shards.main(["write", "--data", str(tmp_path / "index.json"), "--root", str(tmp_path), "--out",
                        str(tmp_path / "s"), "--format", "stage1"]) == 1   # not a stage-1 list: an error, no traceback
