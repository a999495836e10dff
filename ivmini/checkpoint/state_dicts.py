"""Reading and checking state dicts, shared by every loader: read_state_dict (files and containers),
select_prefix (the sub-dict of one model), check_keys (strict: names every missing, unexpected or
mis-shaped key), drop_keys (parts of a file that are not the model, dropped by name)."""
import fnmatch
import logging
import os
import re

import torch

log = logging.getLogger("ivmini.checkpoint")


def read_state_dict(src, weights_only=True):
    """A state dict from a path (.safetensors, or .pt/.pth/.bin via torch.load) or a dict; containers
    {'model'|'module'|'state_dict': {...}} are unwrapped."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=weights_only)
            except Exception as e:  # torch raises UnpicklingError and others; re-raise with the file named
                raise RuntimeError(f"could not read checkpoint {path} with torch.load(weights_only={weights_only}): "
                                   f"{e}. If the file holds other Python objects and you trust it, pass "
                                   f"weights_only=False.") from e
    else:
        sd = src
    if not isinstance(sd, dict):
        raise TypeError(f"checkpoint is a {type(sd).__name__}, not a state dict")
    for key in ("model", "module", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"checkpoint entries are not tensors: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return dict(sd)


def select_prefix(sd, prefix="auto"):
    """Strip key prefixes. prefix="" keeps keys as they are; "name." keeps only keys under it;
    "auto" is described in the module docstring."""
    if prefix != "auto":
        if not prefix:
            return sd
        inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not inside:
            raise KeyError(f"no checkpoint key starts with {prefix!r}; first keys: {list(sd)[:5]}")
        _log_left_out(sd, prefix)
        return inside
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("vision_encoder.") for k in sd):
        return select_prefix(sd, "vision_encoder.")
    return {re.sub(r"^(backbone|encoder)\.", "", k): v for k, v in sd.items()}


def _log_left_out(sd, prefix):
    others = {}
    for k in sd:
        if not k.startswith(prefix):
            label = k.split(".")[0] + (".*" if "." in k else "")
            others[label] = others.get(label, 0) + 1
    if others:
        log.info("using the keys under %r; left out (other parts of the checkpoint): %s", prefix,
                 ", ".join(f"{label} ({n})" for label, n in sorted(others.items())))


def key_problems(expected, sd, against="model"):
    """expected {key: shape}, sd {key: tensor} -> "" when they agree, else every missing, unexpected and
    mis-shaped key, named (the first 20 of each kind), for the caller's error message."""
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    shapes = sorted(f"{k}: checkpoint {tuple(v.shape)} vs {against} {tuple(expected[k])}"
                    for k, v in sd.items() if k in expected and tuple(v.shape) != tuple(expected[k]))
    return "; ".join(f"{what} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                     for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("shape mismatches", shapes)) if keys)


def check_keys(module, sd, ignore=()):
    """Fail on any missing, unexpected or mis-shaped key of `sd` for `module`, naming all of them.
    Keys matching a pattern in `ignore` are dropped from `sd` and may be missing.
    Returns (sd without the ignored keys, sorted model keys that sd does not provide)."""
    ignore = list(ignore)
    hit = lambda k: any(fnmatch.fnmatchcase(k, p) for p in ignore)  # noqa: E731
    own = module.state_dict()
    sd = {k: v for k, v in sd.items() if not hit(k)}
    problems = key_problems({k: v.shape for k, v in own.items() if not hit(k)}, sd)
    if problems:
        raise KeyError(f"checkpoint does not match {type(module).__name__}: {problems}. "
                       f"Pass ignore=[...] for keys you mean to drop.")
    return sd, sorted(k for k in own if k not in sd)


def drop_keys(sd, drop, what):
    """Remove the keys matching `drop` (fnmatch), logging what was dropped."""
    dropped = {k for k in sd if any(fnmatch.fnmatchcase(k, p) for p in drop)}
    if dropped:
        groups = sorted({k.split(".")[0] for k in dropped})
        log.info("%s: dropped %d key(s) that are not the teacher: %s", what, len(dropped), ", ".join(groups))
    return {k: v for k, v in sd.items() if k not in dropped}
