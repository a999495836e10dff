"""Annotation formats, the dataset every stage uses, robust loading and collation (samplers and the DataLoader:
sampling.py).

Formats (paths relative to a data root; the synthetic world writes all of them):
    stage-1 list      "[source] path total_time start end label" per line (single_modality
                      mae_multi.py; start/end in seconds, -1 = whole clip; sources in NO_FLIP_SOURCES,
                      e.g. "ssv2" and "synthetic", are never flipped: their labels say left/right)
    stage-2 JSON      [{"video"|"image": path, "caption": str, "<any>caption<any>": str ..., or
                      "captions": [str, ...], optional "start"/"end" seconds}]  (multi_modality pt_dataset)
    eval JSON         [{"video": path, "caption": str | [str, ...]}]  (VINDLU, retrieval/zero-shot)
    classify CSV      "path,label" per line (Kinetics_sparse)
    instruct JSON     [{"video": path, "QA": [{"i", "q", "a", ...}, ...]}]  (VideoChat2 instruction data)
Captions are cleaned with `pre_text`, identical to the official one. Every reader checks the file
first and raises naming it: a directory, a video or other binary file (passed where the list belongs),
a file without samples.

Robust loading: a video or audio that cannot be decoded (ivmini.data.DecodeError, and only that; a
text file, a picture, a FIFO or a read past the time limit are DecodeErrors too, see video.py) is
skipped: the sample is replaced by the next index of the same media type (an image by an image, so a
batch still stacks), and the batch reports every skipped record as a
(path, reason) pair under "skipped". __getitem__ tries each record at most once, then raises DataError
naming examples: never an endless retry. How many failures are too many is not decided here, because
each DataLoader worker holds its own copy of the dataset: the training loop (and eval) counts samples
drawn and failed over workers, epochs and ranks, and DecodeFailures applies the rule (default: more
than 1 % of the drawn samples, after a grace of 10 failures).

Determinism: each sample's randomness (frame choice, crop, flip, audio window, caption choice) comes
from a numpy Generator seeded with (seed, epoch, index), so it does not depend on worker count or
order; the samplers of sampling.py start mid-epoch, so a resumed run sees exactly the samples it would
have seen.
"""
import codecs
import csv
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Optional

import torch

from .audio import NoAudioStream, audio_features, read_audio
from .transforms import get_transform, make_rng
from .video import DEFAULT_TIMEOUT, DecodeError, read_frames, read_image, video_info

log = logging.getLogger("ivmini.data")
DATA_HINT = "pass the list with --data and the videos' folder with --data-root"


class DataError(RuntimeError):
    """Too many samples could not be decoded (DecodeFailures.check), or none at all (VideoDataset)."""


def pre_text(text, max_l=None):
    """The official caption cleaning: lowercase, drop ,.'!?"()*#:;~, '-' and '/' to spaces, <person>
    to person, collapse spaces, strip; optionally keep the first max_l words."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a string, got {type(text).__name__}: {text!r}")
    text = re.sub(r"([,.'!?\"()*#:;~])", "", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    if max_l:
        words = text.split(" ")
        text = " ".join(words[:max_l])
    return text


@dataclass
class Record:
    path: str                                   # relative to the data root (or absolute)
    media: str = "video"                        # "video" or "image"
    label: int = -1
    captions: dict = field(default_factory=dict)   # key -> caption, e.g. caption / audio_caption / av_caption
    caption_list: list = field(default_factory=list)   # alternatives, one drawn per sample
    start: Optional[float] = None               # seconds
    end: Optional[float] = None
    source: str = ""
    qa: list = field(default_factory=list)


def _fail(path, lineno, msg):
    raise ValueError(f"{path}:{lineno}: {msg}")


def open_annotations(path, newline=None):
    """open() of an annotation file for reading (UTF-8 text), after the checks every reader shares:
    it exists, is a regular file, not a directory, and its first 4 kB are text (no NUL byte, valid
    UTF-8). Each failed check raises naming the file and the likely mix-up."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"annotation file {path} does not exist")
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise ValueError(f"{path} is a directory, not an annotation file: {DATA_HINT}")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file, not an annotation file: {DATA_HINT}")
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # the 4 kB may end inside a character
        text = b"\0" not in head
    except UnicodeDecodeError:
        text = False
    if not text:
        raise ValueError(f"{path} looks like a video (binary data), not an annotation list: {DATA_HINT}")
    return open(path, newline=newline, encoding="utf-8")


def _some(path, records):
    """The records, or a ValueError naming the annotation file when it holds none."""
    if not records:
        raise ValueError(f"{path} holds no samples")
    return records


def read_stage1_list(path, sep=" "):
    records = []
    with open_annotations(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.strip().split(sep) if sep != " " else line.split()
            if not parts or parts == [""]:
                continue
            if len(parts) not in (5, 6):
                _fail(path, lineno, f"expected '[source] path total_time start end label', got {line.strip()!r}")
            source = parts[0] if len(parts) == 6 else ""
            vid, total, start, end, label = parts[-5:]
            try:
                total, start, end, label = float(total), float(start), float(end), int(label)
            except ValueError:
                _fail(path, lineno, f"total_time/start/end must be numbers and label an int: {line.strip()!r}")
            window = total != -1 and start != -1 and end != -1
            records.append(Record(vid, label=label, source=source, start=start if window else None,
                                  end=end if window else None))
    return _some(path, records)


def _load_json_list(path):
    with open_annotations(path) as f:
        text = f.read()
    try:
        data = json.loads(text) if text.strip() else []  # an empty file holds no samples, like "[]"
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return data


def read_stage2_json(path):
    """Errors name the file and the entry's index in the list (0-based)."""
    records = []
    for i, item in enumerate(_load_json_list(path)):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: entry {i}: expected an object, got {item!r}")
        media = "video" if "video" in item else "image" if "image" in item else None
        if media is None:
            raise ValueError(f"{path}: entry {i}: has neither 'video' nor 'image': {item}")
        alts = item.get("captions", [])
        if not (isinstance(alts, list) and all(isinstance(c, str) for c in alts)):
            raise ValueError(f"{path}: entry {i}: 'captions' must be a list of strings, got {alts!r}")
        caps = {k: v for k, v in item.items() if "caption" in k and k != "captions"}
        wrong = {k: v for k, v in caps.items() if not isinstance(v, str)}
        if wrong:
            raise ValueError(f"{path}: entry {i}: caption keys must hold a string (a list goes under "
                             f"'captions'), got {wrong}")
        caps, alts = {k: pre_text(v) for k, v in caps.items()}, [pre_text(c) for c in alts]
        if not caps and not alts:
            raise ValueError(f"{path}: entry {i}: has no caption (a 'caption' string or a 'captions' list): {item}")
        records.append(Record(item[media], media=media, captions=caps, caption_list=alts,
                              start=item.get("start"), end=item.get("end")))
    return _some(path, records)


def read_eval_json(path, caption_key="caption"):
    """caption_key: which caption of each entry is the query (audio_caption, av_caption, ... for audio retrieval)."""
    records = []
    for i, item in enumerate(_load_json_list(path)):
        if "video" not in item or caption_key not in item:
            _fail(path, i, f"entry needs 'video' and {caption_key!r}: {item}")
        caps = item[caption_key] if isinstance(item[caption_key], list) else [item[caption_key]]
        records.append(Record(item["video"], caption_list=[pre_text(c) for c in caps]))
    return _some(path, records)


def read_classify_csv(path, sep=","):
    records = []
    with open_annotations(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter=sep), 1):
            if not row:
                continue
            if len(row) != 2:
                _fail(path, lineno, f"expected 'path{sep}label', got {row}")
            try:
                records.append(Record(row[0], label=int(row[1])))
            except ValueError:
                _fail(path, lineno, f"label must be an int, got {row[1]!r}")
    return _some(path, records)


def read_instruct_json(path):
    records = []
    for i, item in enumerate(_load_json_list(path)):
        if "video" not in item or not item.get("QA"):
            _fail(path, i, f"entry needs 'video' and a non-empty 'QA' list: {item}")
        records.append(Record(item["video"], qa=item["QA"]))
    return _some(path, records)


# sources whose labels depend on left/right: never flipped (official: "ssv2"; the synthetic world)
NO_FLIP_SOURCES = ("ssv2", "sthv2", "something-something", "synthetic")

READERS = {"stage1": read_stage1_list, "stage2": read_stage2_json, "eval": read_eval_json,
           "classify": read_classify_csv, "instruct": read_instruct_json}


# ---------------------------------------------------------------------------------------------

class VideoDataset(torch.utils.data.Dataset):
    """Records -> samples {"video": float32 (3, T, size, size), with audio=True for videos "audio" (998, 64)
    and "has_audio" (False: the video has no audio stream, "audio" is silence), "label", "caption"/"captions", "qa", "index", "path", "skipped"}.

    transform: "stage1" | "stage2" | "test" (see transforms.py); sample: "rand" | "middle";
    flip=False turns horizontal flips off for every record (e.g. the synthetic world's stage-2 JSON).
    timeout: seconds each file read of a sample (its video or image, then its audio) may take, default
    60 s; a slower read is a DecodeError and the record is skipped. "skipped": [(path, reason), ...] of
    the records that failed before this one was loaded (module docstring).
    """

    def __init__(self, records, root, *, num_frames, size, transform="stage1", sample="rand", audio=False,
                 flip=True, seed=0, max_audio_seconds=10, timeout=DEFAULT_TIMEOUT):
        if not records:
            raise ValueError(f"no records to load (data root {root})")
        self.records, self.root = records, root
        self.num_frames, self.size, self.sample, self.audio, self.flip = num_frames, size, sample, audio, flip
        self.transform = get_transform(transform)
        self.seed, self.epoch = seed, 0
        self.max_audio_seconds, self.timeout = max_audio_seconds, timeout

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _path(self, rec):
        return rec.path if os.path.isabs(rec.path) else os.path.join(self.root, rec.path)

    def load(self, index, rng):
        rec = self.records[index]
        path = self._path(rec)
        if rec.media == "image":
            frames = read_image(path, timeout=self.timeout)                                     # (1, H, W, 3) uint8
        else:
            frames = read_frames(path, self.num_frames, self.sample, start=rec.start, end=rec.end, rng=rng,
                                 timeout=self.timeout)                                          # (T, H, W, 3) uint8
        flip = self.flip and rec.source.lower() not in NO_FLIP_SOURCES
        out = {"video": self.transform(frames, self.size, rng, flip=flip), "label": rec.label, "index": index,
               "path": rec.path}
        if self.audio and rec.media == "video":                     # images carry no sound: no audio keys
            out["audio"], out["has_audio"] = self.load_audio(path, rng)                  # (998, 64), bool
        if rec.captions:
            out["captions"] = dict(rec.captions)
        if rec.caption_list:
            out["caption"] = rec.caption_list[rng.integers(len(rec.caption_list))]
        elif "caption" in rec.captions:
            out["caption"] = rec.captions["caption"]
        if rec.qa:
            out["qa"] = rec.qa
        return out

    def load_audio(self, path, rng):
        """-> (features (998, 64), has_audio). A video without an audio stream gets the features of silence
        as long as the video (at most max_audio_seconds) and has_audio=False: counted by the training loop,
        not an error (the official loader crashes there). A broken audio stream is a DecodeError like a
        broken video (the sample is skipped)."""
        try:
            wave = read_audio(path, max_seconds=self.max_audio_seconds, rng=rng, timeout=self.timeout)
            return audio_features(wave), True
        except NoAudioStream:
            seconds = min(video_info(path, timeout=self.timeout)["duration"], self.max_audio_seconds)
            return audio_features(torch.zeros(round(seconds * 16000))), False

    def __getitem__(self, index):
        """Sample `index`, or the next decodable one of the same media type after it (a batch of images
        must stay images to stack); each record is tried at most once."""
        media = self.records[index].media
        skipped = []                                        # (record path, reason) of each failed record
        for attempt in range(len(self.records)):
            j = (index + attempt) % len(self.records)
            if self.records[j].media != media:
                continue
            try:
                sample = self.load(j, make_rng(self.seed, self.epoch, j))
            except DecodeError as e:
                skipped.append((self.records[j].path, e.reason))
                continue
            sample["skipped"] = skipped
            return sample
        examples = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        tried = sum(r.media == media for r in self.records)
        raise DataError(f"none of the {tried} samples of media type {media!r} (data root {self.root}) could be "
                        f"decoded. Examples: {examples}")


class DecodeFailures:
    """Samples drawn and samples that failed to decode, over a whole run, and the rule for too many.

        failures = DecodeFailures(max_fraction=0.01, grace=10)   # drawn=, failed=: counts to resume from
        for batch in loader:
            skipped = batch["skipped"]                 # [(path, reason), ...] (collate)
            drawn, failed = len(batch["index"]) + len(skipped), len(skipped)
            # distributed: sum drawn and failed over ranks here, so every rank adds the same totals
            failures.add(drawn, failed, skipped)
            failures.check()

    drawn counts every record a DataLoader worker tried: the batch's samples plus the skipped ones.
    add(drawn, failed, skipped=()) adds to the counts and keeps the first `max_examples` skipped
    (path, reason) pairs it is given (this process's; pairs may arrive as 2-lists) as examples.
    check() raises DataError once failed > max_fraction * drawn and failed > grace: the counts, the
    percentage and the examples. The grace keeps one broken file early on from ending a run (one
    failure in a first batch of 64 is 1.6 %). state() -> {"drawn", "failed"} for a checkpoint.
    """

    def __init__(self, max_fraction=0.01, grace=10, drawn=0, failed=0, max_examples=5):
        self.max_fraction, self.grace, self.max_examples = max_fraction, grace, max_examples
        self.drawn, self.failed = int(drawn), int(failed)
        self.examples = {}                                  # path -> reason, the first few seen here

    def add(self, drawn, failed, skipped=()):
        self.drawn, self.failed = self.drawn + int(drawn), self.failed + int(failed)
        for path, reason in skipped:
            if len(self.examples) < self.max_examples:
                self.examples.setdefault(path, reason)

    def state(self):
        return {"drawn": self.drawn, "failed": self.failed}

    def check(self):
        if self.failed > self.max_fraction * self.drawn and self.failed > self.grace:
            examples = "; ".join(f"{p}: {r}" for p, r in self.examples.items()) or "none on this rank"
            raise DataError(f"{self.failed} of {self.drawn} samples drawn ({100 * self.failed / self.drawn:.2f} %) "
                            f"could not be decoded, more than the allowed {100 * self.max_fraction:g} %. "
                            f"Fix or remove these files from the annotation list. Examples: {examples}")


def collate(samples):
    """Stack tensors (shapes must agree), numbers -> tensors, dicts of strings -> dict of lists,
    everything else -> list; "skipped" lists of (path, reason) pairs are concatenated."""
    out = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if key == "skipped":
            out[key] = [p for v in vals for p in v]
        elif isinstance(vals[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) > 1:
                raise ValueError(f"cannot batch '{key}' of different shapes {sorted(shapes)} "
                                 f"(mixed images and videos, or different frame counts?)")
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float)):
            out[key] = torch.tensor(vals)
        elif isinstance(vals[0], dict):
            out[key] = {k: [v[k] for v in vals] for k in vals[0]}
        else:
            out[key] = vals
    return out
