"""Video transforms of the official pipelines, on uint8 frame tensors (T, H, W, 3); no PIL needed.

    stage 1 (pretraining): multi-scale crop (scales 1, .875, .75, .66, fixed corner/centre offsets,
             max distortion 1) resized to `size`, horizontal flip (not for SSv2-like sources)
             (single_modality datasets/transforms.py GroupMultiScaleCrop, build.py)
    stage 2 (alignment):   RandomResizedCrop(size, scale 0.5-1, ratio 3/4-4/3, bicubic) + flip
             (multi_modality dataset/__init__.py get_train_transform)
    test:                  square resize to `size`, bicubic, no centre crop
then /255 and ImageNet mean/std, giving float32 (3, T, size, size), the encoder's layout.

All randomness comes from a numpy Generator passed in, so a sample's augmentation is fixed by the
seed the dataset derives for it (see datasets.py). Resizing uses torch's interpolate with
antialiasing when shrinking, which is what PIL's resize does.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)   # ImageNet, as the official pipelines
STD = (0.229, 0.224, 0.225)


def _check(frames):
    if not (isinstance(frames, torch.Tensor) and frames.dtype == torch.uint8 and frames.dim() == 4
            and frames.shape[-1] == 3):
        raise ValueError(f"frames must be a uint8 tensor (T, H, W, 3), got "
                         f"{getattr(frames, 'dtype', type(frames))} {tuple(getattr(frames, 'shape', ()))}")


def crop_resize(frames, top, left, h, w, size, mode):
    """Crop (top, left, h, w) of every frame and resize to (size, size) -> float32 (T, 3, size, size), 0..255."""
    x = frames[:, top:top + h, left:left + w].permute(0, 3, 1, 2).float()       # (T, 3, h, w)
    if (h, w) == (size, size):
        return x
    shrink = h > size or w > size
    x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=shrink)
    return x.clamp_(0, 255) if mode == "bicubic" else x


def multi_scale_crop_params(height, width, size, rng, scales=(1.0, 0.875, 0.75, 0.66), max_distort=1,
                            more_fix_crop=True):
    """(top, left, h, w) of the TSN multi-scale crop: crop sides from scales x the short side (snapped to
    `size` within 3 px), width/height scale indices at most `max_distort` apart, and the offset one of
    5 (or 13 with more_fix_crop) fixed positions on a 4 x 4 grid of steps."""
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= max_distort]
    w, h = pairs[rng.integers(len(pairs))]
    ws, hs = (width - w) // 4, (height - h) // 4
    grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2)]
    if more_fix_crop:
        grid += [(0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    gx, gy = grid[rng.integers(len(grid))]
    return gy * hs, gx * ws, h, w


def random_resized_crop_params(height, width, rng, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) as torchvision's RandomResizedCrop: up to 10 draws of an area fraction and a
    log-uniform aspect ratio; if none fits, the largest centre crop with the ratio clamped to range."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def normalize(x):
    """float (T, 3, H, W) in 0..255 -> float32 (3, T, H, W), ImageNet mean/std."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    return ((x - mean) / std).permute(1, 0, 2, 3).contiguous()


def stage1_train(frames, size, rng, flip=True):
    _check(frames)
    top, left, h, w = multi_scale_crop_params(frames.shape[1], frames.shape[2], size, rng)
    x = crop_resize(frames, top, left, h, w, size, "bilinear")
    if flip and rng.random() < 0.5:
        x = x.flip(-1)
    return normalize(x)


def stage2_train(frames, size, rng, flip=True):
    _check(frames)
    top, left, h, w = random_resized_crop_params(frames.shape[1], frames.shape[2], rng)
    x = crop_resize(frames, top, left, h, w, size, "bicubic")
    if flip and rng.random() < 0.5:
        x = x.flip(-1)
    return normalize(x)


def test_transform(frames, size, rng=None, flip=False):
    _check(frames)
    return normalize(crop_resize(frames, 0, 0, frames.shape[1], frames.shape[2], size, "bicubic"))


TRANSFORMS = {"stage1": stage1_train, "stage2": stage2_train, "test": test_transform}


def get_transform(name):
    """name in stage1 | stage2 | test -> fn(frames uint8 (T,H,W,3), size, rng, flip) -> float32 (3,T,size,size)."""
    if name not in TRANSFORMS:
        raise KeyError(f"unknown transform {name!r}; choose one of {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]


def make_rng(*keys):
    """A numpy Generator seeded by a tuple of non-negative ints (e.g. seed, epoch, sample index)."""
    return np.random.default_rng([int(k) for k in keys])
