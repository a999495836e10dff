"""How a synthetic clip looks and sounds: the motion program, anti-aliased rendering, the soundtrack and the
byte-deterministic mp4 / PNG writers. What a clip contains (objects, motions, sound kind, captions, QA, splits)
is chosen in synthetic.py, which re-exports everything here; the numbers below are part of the world's
definition (a change needs a VERSION bump there).

Tests: tests/test_data_synthetic.py.
"""
import av
import numpy as np

FPS, SECONDS, SR = 8, 2, 16000
T = FPS * SECONDS               # 16 frames
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230),
           "yellow": (230, 210, 40), "white": (240, 240, 240), "purple": (160, 60, 210)}
SIZES = {"small": 0.07, "large": 0.12}          # half-extent r as a fraction of the frame side
BOUND = {"square": 2 ** 0.5, "circle": 1.0, "triangle": 1.5, "rectangle": 1.46}  # bounding radius / r
STEP = {"left": (-0.3, 0.0), "right": (0.3, 0.0), "up": (0.0, -0.3), "down": (0.0, 0.3)}  # per phase
ROTATE_DEG, GROW = 90.0, 1.6    # per phase: a quarter turn; x1.6 in size
BEEP_S = 0.15


def program(phases):
    """The motion program shared by a clip's shapes -> offset (T, 2), scale (T,), angle (T,) per frame."""
    u = np.arange(T) / (T - 1)
    off, log_s, ang = np.zeros((T, 2)), np.zeros(T), np.zeros(T)
    for k, m in enumerate(phases):
        p = np.clip(u * len(phases) - k, 0.0, 1.0)          # progress through phase k, 0..1
        if m in STEP:
            off += p[:, None] * np.array(STEP[m])
        elif m == "rotate":
            ang += p * ROTATE_DEG
        elif m in ("grow", "shrink"):
            log_s += p * np.log(GROW) * (1 if m == "grow" else -1)
    log_s -= (log_s.max() + log_s.min()) / 2                 # sizes swing symmetrically around the base
    return off, np.exp(log_s), ang


def background(seed, size):
    """Smooth low-contrast grey: a 5x5 grid of values in ~[50, 110], bilinearly upsampled -> (size, size, 3)."""
    rng = np.random.default_rng(seed)
    grid = rng.uniform(55, 105, (5, 5, 1)) + rng.uniform(-5, 5, (1, 1, 3))
    w = np.maximum(0, 1 - np.abs(np.linspace(0, 4, size)[:, None] - np.arange(5)[None]))  # (size, 5) hat weights
    return np.einsum("ia,abc,jb->ijc", w, grid, w)


def shape_mask(shape, dx, dy, r, angle):
    """Boolean mask of a solid shape of half-extent r, rotated by angle degrees, at offsets (dx, dy)."""
    a = np.deg2rad(angle)
    u, v = np.cos(a) * dx + np.sin(a) * dy, -np.sin(a) * dx + np.cos(a) * dy   # into the shape's frame
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= r
    if shape == "rectangle":
        return (np.abs(u) <= 1.3 * r) & (np.abs(v) <= 0.65 * r)
    R = BOUND["triangle"] * r           # equilateral, circumradius R, apex up, area centroid at 0
    normals = np.deg2rad([90, 210, 330])
    return np.all([u * np.cos(t) + v * np.sin(t) <= R / 2 for t in normals], axis=0)


def tracks(clip, size):
    """Per shape, per frame: centre (x, y) in pixel-index units (mean column/row of its pixels), scale, angle."""
    off, scale, ang = program(clip["phases"])
    return [{"positions": ((np.array(o["start"]) + off) * size - 0.5), "scales": scale, "angles": ang,
             "radius_px": SIZES[o["size"]] * size} for o in clip["objects"]]


def render(clip, size, ss=4):
    """-> uint8 (T, size, size, 3). Anti-aliased: each pixel is blended by the shape's coverage, measured
    on ss x ss sub-samples, so the coverage-weighted centroid is the exact centre in the metadata."""
    bg = background(clip["background_seed"], size)
    sub = (np.arange(ss) + 0.5) / ss - 0.5                   # sub-sample offsets from a pixel's centre
    frames, trs = np.empty((T, size, size, 3), np.uint8), tracks(clip, size)
    for t in range(T):
        img = bg.copy()
        for o, tr in zip(clip["objects"], trs):
            (cx, cy), r = tr["positions"][t], tr["radius_px"] * tr["scales"][t]
            b = int(np.ceil(BOUND[o["shape"]] * r)) + 1     # only the shape's bounding box is rasterised
            x0, x1 = max(0, int(cx) - b), min(size, int(cx) + b + 2)
            y0, y1 = max(0, int(cy) - b), min(size, int(cy) + b + 2)
            ys = np.arange(y0, y1)[:, None, None, None] + sub[None, :, None, None] - cy   # (h, ss, 1, 1)
            xs = np.arange(x0, x1)[None, None, :, None] + sub[None, None, None, :] - cx   # (1, 1, w, ss)
            cov = shape_mask(o["shape"], xs, ys, r, tr["angles"][t]).mean(axis=(1, 3))     # (h, w)
            patch = img[y0:y1, x0:x1]
            patch += cov[..., None] * (np.array(COLOURS[o["colour"]]) - patch)
        frames[t] = np.clip(np.rint(img), 0, 255)
    return frames


def beep_onsets(n):
    slot = SECONDS / n
    return [k * slot + (slot - BEEP_S) / 2 for k in range(n)]


def soundtrack(clip):
    """-> float32 (SR * SECONDS,) in [-1, 1]."""
    snd, n = clip["sound"], SR * SECONDS
    t = np.arange(n) / SR
    ramp = lambda m, edge: np.minimum(1, np.minimum(np.arange(m), np.arange(m)[::-1]) / (edge * SR))  # noqa: E731
    if snd["kind"] == "beeps":
        env, m = np.zeros(n), int(BEEP_S * SR)
        for on in beep_onsets(snd["beeps"]):
            env[int(on * SR):int(on * SR) + m] = ramp(m, 0.005)     # 5 ms fades: no clicks
        x = 0.5 * env * np.sin(2 * np.pi * snd["pitch_hz"] * t)
    elif snd["kind"] == "tone":
        x = 0.3 * ramp(n, 0.02) * np.sin(2 * np.pi * snd["pitch_hz"] * t)
    elif snd["kind"] == "noise":
        x = 0.1 * ramp(n, 0.02) * np.random.default_rng(clip["noise_seed"]).standard_normal(n)
    else:
        x = np.zeros(n)
    return np.clip(x, -1, 1).astype(np.float32)


def write_mp4(path, frames, audio):
    """H.264 (libx264, yuv420p) + AAC mono 16 kHz in mp4, byte-deterministic: one x264 thread, and no
    mb-tree, whose assembly was seen to read uninitialised memory (the same frames gave different
    bytes after unrelated allocations, ~4% of clips)."""
    with av.open(path, "w", format="mp4") as c:
        x264 = {"crf": "20", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
        v = c.add_stream("libx264", rate=FPS, options=x264)
        v.width = v.height = frames.shape[1]
        v.pix_fmt = "yuv420p"
        a = c.add_stream("aac", rate=SR, layout="mono")
        for k, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = k
            c.mux(v.encode(f))
        c.mux(v.encode())
        for s in range(0, len(audio), 1024):    # the AAC frame size
            f = av.AudioFrame.from_ndarray(audio[None, s:s + 1024], format="fltp", layout="mono")
            f.sample_rate, f.pts = SR, s
            c.mux(a.encode(f))
        c.mux(a.encode())


def write_still(path, img):
    """uint8 (H, W, 3) -> a lossless PNG through FFmpeg's png encoder (~3 ms at 112 px; the zlib level 9 of
    contact_sheet.write_png takes ~10 ms, a quarter of a clip's time)."""
    with av.open(path, "w", format="image2") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = img.shape[1], img.shape[0], "rgb24"
        c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
