"""A contact sheet of the synthetic world: decoded frames of a few clips as one PNG grid.

    python -m ivmini.data.synthetic --out DIR --contact-sheet sheet.png

The PNG is written by hand (zlib + the chunk layout), so no imaging library is needed.
"""
import json
import os
import struct
import zlib

import av
import numpy as np

from .synthetic_media import T


def write_png(path, img):
    """uint8 (H, W, 3) -> PNG (8-bit RGB, 'Sub' filter, zlib), no imaging library needed."""
    h, w, _ = img.shape
    sub = img.copy()
    sub[:, 1:] -= img[:, :-1]               # filter 1: each byte minus the byte one pixel left (mod 256)
    raw = np.concatenate([np.ones((h, 1), np.uint8), sub.reshape(h, -1)], axis=1).tobytes()
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def decode_frames(path):
    """All frames of a video -> uint8 (T, H, W, 3). (The training loaders use ivmini/data/video.py.)"""
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def contact_sheet(world, png, rows=6, cols=8, gap=2):
    """Decoded frames of the first `rows` clips (test split first), `cols` frames each, as a PNG grid;
    returns the captions of the rows (top to bottom)."""
    metas = []
    for split in ("test", "val", "train"):
        with open(os.path.join(world, "annotations", f"meta_{split}.json")) as f:
            metas += json.load(f)
    metas = metas[:rows]
    pick = np.linspace(0, T - 1, cols).round().astype(int)
    tiles = [decode_frames(os.path.join(world, m["video"]))[pick] for m in metas]
    s = tiles[0].shape[1]
    sheet = np.full((len(tiles) * (s + gap) - gap, cols * (s + gap) - gap, 3), 255, np.uint8)
    for r, frames in enumerate(tiles):
        for c, img in enumerate(frames):
            sheet[r * (s + gap):r * (s + gap) + s, c * (s + gap):c * (s + gap) + s] = img
    write_png(png, sheet)
    return [m["av_caption"] for m in metas]
