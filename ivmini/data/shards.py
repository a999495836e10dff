"""Webdataset-format tar shards: pack an annotation file and its media into shards, check them, read them back.

Why: a list of loose files on a shared disk does not scale to millions of clips (one open + seek per clip
per epoch); tar shards read sequentially in large blocks (issue 17). The format is the one of the
webdataset library, so shards from other webdataset tools read here and ours read there.

Format (webdataset convention): a sample is a run of consecutive tar members sharing a key, the member
name up to the first dot of its basename (directories included: `a/b/000017.mp4` has key `a/b/000017`
and extension `mp4`). Members without an extension are ignored. A shard written here holds, per record
of the annotation file, in this order:
    <key>.json        the record: path, media, label, captions, caption_list, start, end, source, qa
                      (datasets.Record, captions already cleaned by the reader), enough to rebuild it
    <key>.<ext>       the media file's bytes; ext = the lowercased extension of the record's path
                      (mp4, png, ...; "video"/"image" when the path has none)
    <key>.fbank.npy   with --fbank, videos with an audio stream only: float32 (998, 64) BEATs input
                      features of the first 10 s (audio.audio_features). A pre-extracted window is fixed:
                      it cannot be the random 10 s window the loader draws for longer clips.
Keys are the record's index in the annotation file, zero-padded to 9 digits: unique and stable, so a
resumed write produces the same bytes. Tar headers carry no time, owner or mode of the machine
(mtime 0, uid/gid 0, mode 0444): the same input gives byte-identical shards.

Layout of SHARDS/:
    shard-000000.tar, shard-000001.tar, ...
    index.json   {"version": 1, "format": "webdataset", "complete": bool,
                  "source": {"path", "sha256", "format"}, "args": {"root", "shard_size", "fbank"},
                  "shards": [{"name", "samples", "bytes", "sha256", "records": [lo, hi)}, ...],
                  "total": samples in all shards, "skipped": [{"index", "path", "reason"}, ...]}
    "records" is the range of annotation indices a shard covers (its samples plus the skipped records
    among them).

Atomicity and resume: a shard is written to shard-NNNNNN.tar.tmp, fsync'ed, then os.replace'd; index.json
is rewritten (tmp + os.replace) after every finished shard. An interrupted write therefore never lists a
half-written shard, and `write` run again with the same arguments resumes after the last listed shard (a
.tmp leftover is deleted; a shard renamed but not yet listed is rewritten with the same bytes). Other
arguments into a folder with an index is an error unless --overwrite.

Unreadable inputs (missing, not a regular file, a read error; with --fbank an audio stream that does not
decode) are skipped and listed in the index. Whether a video decodes is not checked here: the loader
counts decode failures at training time (datasets.DecodeFailures).

    python -m ivmini.data.shards write --data ANNOTATIONS --root DIR --out SHARDS/ [--shard-size 1GB|N]
                                       [--format stage1|stage2|eval|classify|instruct] [--fbank] [--overwrite]
    python -m ivmini.data.shards verify SHARDS/          # exit 1 with a summary of every problem
    python -m pytest tests/test_shards.py -q

Reading: iter_shard(path) streams one tar (tarfile "r|") and yields {"key", "json": dict, "<ext>": bytes, ...};
record_of(sample) -> (Record, media bytes); read_index(dir) validates index.json.
"""
import argparse
import dataclasses
import hashlib
import io
import json
import os
import re
import stat
import sys
import tarfile

import numpy as np
from tqdm import tqdm

from .audio import NoAudioStream, audio_features, read_audio
from .datasets import READERS, Record, open_annotations
from .video import DecodeError

VERSION = 1
INDEX = "index.json"
KEY_DIGITS = 9                      # 10^9 records per annotation file
VIDEO_EXTS = ("mp4", "avi", "mkv", "webm", "mov", "m4v", "flv", "wmv", "mpg", "mpeg", "ts", "video")
IMAGE_EXTS = ("png", "jpg", "jpeg", "bmp", "webp", "gif", "image")
RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record))
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
BLOCK = 512                         # tar block: every header is one, every member's data is padded to one


class ShardError(ValueError):
    """A shard or its index is missing, corrupt, truncated or inconsistent; the message names the shard."""


def shard_name(n):
    return f"shard-{n:06d}.tar"


def split_name(name):
    """Tar member name -> (key, extension): key = the name up to the first dot of its basename.
    (None, None) for a name without an extension (webdataset ignores those)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None, None
    return (f"{head}/{stem}" if head else stem), ext


def media_ext(path, media):
    """The member extension of a record's media: its path's lowercased extension, else the media type."""
    ext = os.path.splitext(path)[1][1:].lower()
    return ext if ext and "/" not in ext else media


# ---------------------------------------------------------------------------------------------- reading

def iter_shard(path):
    """Yield the samples of one tar, streaming: {"key": str, "json": dict (if present), "<ext>": bytes, ...}.

    Consecutive members sharing a key form one sample, in any member order; directories and names without
    an extension are skipped. A tar that ends without its end-of-archive block (cut mid-member or between
    members) or has a corrupt header yields the complete samples before the damage, then raises ShardError
    naming the shard; so does a sample holding the same extension twice or a .json that is not JSON.
    """
    done, sample = 0, None
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if key is None:
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} ends after {len(data)} of {member.size} bytes")
                if sample is not None and sample["key"] != key:
                    yield _finish(path, sample)
                    done, sample = done + 1, None
                sample = sample or {"key": key}
                if ext in sample:
                    raise ShardError(f"{path}: sample {key!r} holds the member .{ext} twice")
                sample[ext] = data
            end = tar.offset                # where the next header would start: the end-of-archive block
        except (tarfile.TarError, EOFError) as e:
            raise ShardError(f"{path}: truncated or corrupt after {done} complete samples: {e}") from e
        f.seek(end)
        if f.read(BLOCK) != bytes(BLOCK):   # tarfile ends quietly at a missing or garbled header: check it
            raise ShardError(f"{path}: truncated or corrupt after {done} complete samples: no end-of-archive "
                             f"block at byte {end}")
    if sample is not None:
        yield _finish(path, sample)


def _finish(path, sample):
    """Parse a sample's .json member (bytes -> dict), naming the shard and key when it is not JSON."""
    if "json" in sample:
        try:
            sample["json"] = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardError(f"{path}: sample {sample['key']!r}: .json member is not JSON: {e}") from e
    return sample


def record_of(sample):
    """A sample of iter_shard -> (datasets.Record, media bytes) for the decoder.

    The .json member holds Record fields (any subset; an unknown field is an error, not dropped). Without a
    "path" the record's path is "<key>.<ext>" of its one media member (VIDEO_EXTS / IMAGE_EXTS), which also
    gives the media type: so shards of other tools that carry a video and a json of labels read too.
    """
    key, meta = sample["key"], sample.get("json")
    if not isinstance(meta, dict):
        raise ShardError(f"sample {key!r} has no .json annotation member (an object), members: {_members(sample)}")
    unknown = sorted(set(meta) - set(RECORD_FIELDS))
    if unknown:
        raise ShardError(f"sample {key!r}: .json has fields {unknown} that a Record does not know ({RECORD_FIELDS})")
    if "path" in meta:
        rec = Record(**meta)
        ext = media_ext(rec.path, rec.media)
    else:
        found = [e for e in sample if e in VIDEO_EXTS + IMAGE_EXTS]
        if len(found) != 1:
            raise ShardError(f"sample {key!r}: expected one media member, found {found}; members: {_members(sample)}")
        ext = found[0]
        rec = Record(**{"path": f"{key}.{ext}", "media": "video" if ext in VIDEO_EXTS else "image", **meta})
    if ext not in sample:
        raise ShardError(f"sample {key!r} lacks its media member .{ext}; members: {_members(sample)}")
    return rec, sample[ext]


def _members(sample):
    return sorted(k for k in sample if k != "key")


def read_index(path):
    """index.json (or the folder holding it) -> the index dict with "dir" (the shards' folder) added.
    Checks the version, the format, the fields, the total, and that every listed shard exists."""
    folder, path = (path, os.path.join(path, INDEX)) if os.path.isdir(path) else (os.path.dirname(path), path)
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"cannot read the shard index {path}: {e}") from e
    if not isinstance(index, dict) or index.get("format") != "webdataset" or index.get("version") != VERSION:
        raise ShardError(f"{path} is not a version-{VERSION} webdataset index of ivmini.data.shards")
    if not {"complete", "source", "args", "shards", "total", "skipped"} <= set(index):
        raise ShardError(f"{path}: lacks some of complete/source/args/shards/total/skipped")
    for s in index["shards"]:
        if not {"name", "samples", "bytes", "sha256"} <= set(s):
            raise ShardError(f"{path}: shard entry {s} lacks name/samples/bytes/sha256")
        if not os.path.isfile(os.path.join(folder, s["name"])):
            raise ShardError(f"{path}: shard {s['name']} is listed but missing from {folder}")
    if index["total"] != sum(s["samples"] for s in index["shards"]):
        raise ShardError(f"{path}: total {index['total']} is not the sum of the shards' sample counts")
    return {**index, "dir": os.path.abspath(folder)}


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(folder):
    """Every problem of a shard folder, as messages naming the shard ([] when all is well): the index,
    each listed shard's size, sha256, sample count and samples (json + media members), extra .tar files."""
    try:
        index = read_index(folder)
    except ShardError as e:
        return [str(e)]
    problems = [] if index["complete"] else [f"{folder}: the write did not finish (rerun the same write to resume)"]
    for s in index["shards"]:
        path = os.path.join(folder, s["name"])
        if os.path.getsize(path) != s["bytes"]:
            problems.append(f"{s['name']}: {os.path.getsize(path)} bytes on disk, the index says {s['bytes']}")
        if sha256_of(path) != s["sha256"]:
            problems.append(f"{s['name']}: sha256 differs from the index (corrupt, or an index of another shard set)")
        n = 0
        try:
            for sample in iter_shard(path):
                n += 1
                try:
                    record_of(sample)
                except ShardError as e:         # one sample's problem: the others are still checked
                    problems.append(f"{s['name']}: {e}")
        except ShardError as e:                 # truncated or corrupt: the samples after it cannot be read
            problems.append(f"{s['name']}: {e}")
        if n != s["samples"]:
            problems.append(f"{s['name']}: {n} samples read, the index says {s['samples']}")
    listed = {s["name"] for s in index["shards"]}
    extra = sorted(n for n in os.listdir(folder) if n.endswith(".tar") and n not in listed)
    problems += [f"{n}: a .tar in {folder} that the index does not list" for n in extra]
    return problems


# ---------------------------------------------------------------------------------------------- writing

def parse_shard_size(text):
    """"1GB", "500MB", "2GiB" -> ("bytes", n); a plain integer "1000" -> ("samples", n)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if m and not m.group(2) and "." not in m.group(1) and int(m.group(1)) > 0:
        return "samples", int(m.group(1))
    if m and m.group(2).upper() in UNITS and float(m.group(1)) > 0:
        return "bytes", int(float(m.group(1)) * UNITS[m.group(2).upper()])
    raise ValueError(f"--shard-size {text!r}: give bytes with a unit ({', '.join(UNITS)}: '1GB') "
                     f"or a sample count (a positive integer: '1000')")


def detect_format(path):
    """The READERS name of an annotation file: .txt stage-1 list, .csv classify list, .json by content
    ("QA" -> instruct, a list-valued "caption" -> eval, else stage-2)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".txt", ".csv"):
        return "stage1" if ext == ".txt" else "classify"
    if ext == ".json":
        with open_annotations(path) as f:
            items = json.load(f)
        first = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}
        return "instruct" if "QA" in first else "eval" if isinstance(first.get("caption"), list) else "stage2"
    raise ValueError(f"cannot tell the format of {path} from its extension: pass --format ({', '.join(READERS)})")


def _member(name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
    return info, io.BytesIO(data)


def tar_bytes(members):
    """Bytes a sample adds to a tar: a header block per member plus its data padded to whole blocks."""
    return sum(BLOCK + -(-len(data) // BLOCK) * BLOCK for _, data in members)


def add_sample(tar, members):
    """Append one sample's members [(name, bytes), ...] to an open tar (tests patch this to interrupt)."""
    for name, data in members:
        tar.addfile(*_member(name, data))


def _sample(i, rec, root, fbank):
    """Record i -> its tar members [(name, bytes)]; OSError / DecodeError when its files cannot be read."""
    path = rec.path if os.path.isabs(rec.path) else os.path.join(root, rec.path)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        media = f.read()
    key = f"{i:0{KEY_DIGITS}d}"
    members = [(f"{key}.json", json.dumps(dataclasses.asdict(rec), sort_keys=True).encode()),
               (f"{key}.{media_ext(rec.path, rec.media)}", media)]
    if fbank and rec.media == "video":
        try:
            feats = audio_features(read_audio(path)).numpy()                   # (998, 64) float32
        except NoAudioStream:
            return members                          # a silent clip: no fbank member, not an error
        buf = io.BytesIO()
        np.save(buf, feats)
        members.append((f"{key}.fbank.npy", buf.getvalue()))
    return members


def _write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _prepare(out, index, overwrite):
    """The index to continue from: the existing one when written with the same source and arguments (resume),
    else a fresh one; removes leftovers. Another shard set in `out` is an error unless overwrite."""
    os.makedirs(out, exist_ok=True)
    ours = [n for n in os.listdir(out) if re.fullmatch(r"shard-\d{6}\.tar(\.tmp)?|index\.json(\.tmp)?", n)]
    old = os.path.join(out, INDEX)
    if overwrite:
        for n in ours:
            os.remove(os.path.join(out, n))
        return index
    if os.path.exists(old):
        prev = read_index(out)
        same = prev["source"] == index["source"] and prev["args"] == index["args"]
        if not same:
            raise ShardError(f"{out} holds shards of other arguments ({prev['source']}, {prev['args']}); "
                             f"pass --overwrite to replace them, or choose another --out")
        for n in ours:
            if n.endswith(".tmp"):
                os.remove(os.path.join(out, n))     # a half-written shard of an interrupted write
        return {k: v for k, v in prev.items() if k != "dir"}
    if any(n.endswith(".tar") for n in ours):
        raise ShardError(f"{out} holds shard-*.tar files but no {INDEX}: pass --overwrite to replace them")
    return index


def write_shards(data, root, out, shard_size="1GB", *, fmt=None, fbank=False, overwrite=False, progress=False):
    """Pack the records of annotation file `data` (media under `root`) into tar shards in `out`; -> the index.
    Resumes an interrupted write of the same arguments (module docstring). Raises ValueError when no record
    could be read."""
    fmt = fmt or detect_format(data)
    records = READERS[fmt](data)
    unit, limit = parse_shard_size(shard_size)
    index = {"version": VERSION, "format": "webdataset", "complete": False,
             "source": {"path": os.path.abspath(data), "sha256": sha256_of(data), "format": fmt},
             "args": {"root": os.path.abspath(root), "shard_size": f"{limit} {unit}", "fbank": fbank},
             "shards": [], "total": 0, "skipped": []}
    index = _prepare(out, index, overwrite)
    start = index["shards"][-1]["records"][1] if index["shards"] else 0
    if not index["complete"]:
        _write_json(os.path.join(out, INDEX), index)
    tar, lo, count, size = None, start, 0, 0

    def close(hi):
        tar.close()
        tmp = os.path.join(out, shard_name(len(index["shards"])) + ".tmp")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())        # on disk before the rename and the index that lists it
        index["shards"].append({"name": shard_name(len(index["shards"])), "samples": count,
                                "bytes": os.path.getsize(tmp), "sha256": sha256_of(tmp), "records": [lo, hi]})
        index["total"] += count
        os.replace(tmp, tmp[:-len(".tmp")])
        _write_json(os.path.join(out, INDEX), index)

    from_here = range(start, len(records))
    for i in (bar := tqdm(from_here, desc=f"shards {out}", unit="sample", disable=not progress)):
        try:
            members = _sample(i, records[i], root, fbank)
        except (OSError, DecodeError) as e:
            index["skipped"].append({"index": i, "path": records[i].path, "reason": str(e)})
            bar.set_postfix(skipped=len(index["skipped"]))
            continue
        grow = tar_bytes(members)
        if tar is not None and (count >= limit if unit == "samples" else size + grow > limit):
            close(i)                    # the shard is full: it covers records [lo, i)
            tar, lo = None, i
        if tar is None:
            tmp = os.path.join(out, shard_name(len(index["shards"])) + ".tmp")
            tar, count, size = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT), 0, 0
        add_sample(tar, members)
        count, size = count + 1, size + grow
    bar.close()
    if tar is not None:
        close(len(records))
    index["complete"] = True
    _write_json(os.path.join(out, INDEX), index)
    if index["total"] == 0:
        raise ValueError(f"none of the {len(records)} records of {data} could be read (root {root}): "
                         f"see 'skipped' in {os.path.join(out, INDEX)}")
    return index


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ivmini.data.shards", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="pack an annotation file and its media into tar shards")
    w.add_argument("--data", required=True, help="annotation file (any format of datasets.READERS)")
    w.add_argument("--root", required=True, help="folder the annotation paths are relative to")
    w.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar and index.json")
    w.add_argument("--shard-size", default="1GB", help="bytes per shard ('1GB', '500MB') or samples (an integer)")
    w.add_argument("--format", choices=sorted(READERS), help="annotation format (default: from the file)")
    w.add_argument("--fbank", action="store_true", help="add <key>.fbank.npy audio features of each video")
    w.add_argument("--overwrite", action="store_true", help="replace the shards of other arguments in --out")
    v = sub.add_parser("verify", help="check every shard against index.json")
    v.add_argument("folder")
    args = p.parse_args(argv)
    if args.command == "verify":
        problems = verify(args.folder)
        for msg in problems:
            print(msg, file=sys.stderr)
        print(f"{args.folder}: {len(problems)} problem(s)" if problems else f"{args.folder}: all shards match the index")
        return 1 if problems else 0
    try:
        index = write_shards(args.data, args.root, args.out, args.shard_size, fmt=args.format, fbank=args.fbank,
                             overwrite=args.overwrite, progress=True)
    except (ShardError, ValueError, FileNotFoundError) as e:    # bad input: the message says which, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    skipped = index["skipped"]
    print(f"{args.out}: {index['total']} samples in {len(index['shards'])} shards; {len(skipped)} skipped"
          + "".join(f"\n  {s['path']}: {s['reason']}" for s in skipped[:20]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
