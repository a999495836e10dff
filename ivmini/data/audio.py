"""Audio: PyAV decoding to 16 kHz mono, a pure-torch Kaldi log-Mel filterbank, BEATs input features.

InternVideo2 feeds its BEATs audio encoder (facts §3.3; official `load_audio_av`) with:
    mono 16 kHz wave, at most 10 s (a random window when longer)
    -> x 2^15 -> Kaldi fbank (64 mel bins, 25 ms frames, 10 ms shift, all other options Kaldi/torchaudio
       defaults: povey window, no dither, htk_compat off, no energy)
    -> (fbank - 15.41663) / (2 * 6.55582)
    -> zero rows appended (after normalisation) or rows cut so that there are 998 frames.
10 s at 16 kHz gives exactly 1 + (160000 - 400) // 160 = 998 frames.

`fbank` reimplements torchaudio.compliance.kaldi.fbank (same options and defaults) from the Kaldi
algorithm (feat/feature-window.cc, feature-fbank.cc, mel-computations.cc), because torchaudio's
PyPI wheel does not import next to CPU torch (environment_notes §4). Not supported: VTLN warping,
`min_duration` and multi-channel input (torchaudio uses channel 0; we take a 1-D wave). A wave
shorter than one window gives 0 frames with snip_edges (torchaudio raises an AssertionError there), and
Kaldi's frame count without it. It is differentiable except at the log floor.

Differences from the official loader, all deliberate:
- Resampling uses FFmpeg's swresample (av.AudioResampler), not torchaudio's sinc resampler.
- All channels are averaged. The official code averages only when there are exactly 2 channels, so a
  5.1 track reached kaldi.fbank with 6 channels, and fbank kept channel 0 (front left).
- AAC decoders emit samples past the end of the stream, because the encoder pads its last frame: 888
  extra samples at 44.1 kHz for a 2 s clip. The wave is trimmed to where the last packet ends
  (pts + duration). In mp4/mov that is exact to the sample. The header's stream duration is not,
  because the edit list stores it in ms. One exception: a last packet that starts after the ms-rounded
  end is dropped by FFmpeg's demuxer, so the wave can be up to 1 ms short. In webm/mkv packet times
  are in ms too, so nothing is trimmed there. Opus and flac come out exact, because the decoder drops
  the padding the container marks. AAC in mkv keeps its tail.
- The whole track is decoded and then cut, not seeked. Decoding and resampling 60 s of 48 kHz
  stereo AAC took 80-130 ms on this 2-core CPU. Like the video reader, a read has a time limit
  (`timeout`, checked between packets), and only regular files that are not text are opened.
"""
import math
from fractions import Fraction

import av
import numpy as np
import torch

from ivmini.data.video import AV_ERRORS, DEFAULT_TIMEOUT, Deadline, DecodeError, open_media

FBANK_MEAN, FBANK_STD = 15.41663, 6.55582  # official normalisation of BEATs inputs
NUM_FRAMES = 998  # official fbank length: 10 s of 16 kHz audio


class NoAudioStream(DecodeError):
    """The file opened and is a media file, but has no audio stream: a silent clip, not a broken one
    (the stage-2 dataset gives it silence and has_audio=False instead of skipping it)."""


def read_audio(path, sr: int = 16000, max_seconds: float = 10, rng=None, timeout=DEFAULT_TIMEOUT) -> torch.Tensor:
    """First audio stream of `path` -> float32 (L,) mono at `sr` Hz, at most max_seconds long.

    A longer stream gives a window of max_seconds: at a uniformly random start if rng
    (numpy.random.Generator) is given, else at 0. No padding. NoAudioStream (a DecodeError) if the
    file has no audio stream, DecodeError if its audio cannot be decoded, or after `timeout` seconds
    (None: no limit).
    """
    deadline = Deadline(path, timeout)
    with open_media(path) as container:
        if not container.streams.audio:
            raise NoAudioStream(path, "no audio stream")
        stream = container.streams.audio[0]
        # layout=None keeps the channels; we average them ourselves (swresample's downmix is not a mean).
        resampler = av.AudioResampler(format="fltp", layout=None, rate=sr)
        chunks = []  # each (C, n) float32
        first, end = None, None  # pts of the first decoded frame; end of the last packet (stream ticks)
        try:
            for packet in container.demux(stream):
                deadline.check()
                if packet.pts is not None and packet.duration:
                    end = packet.pts + packet.duration if end is None else max(end, packet.pts + packet.duration)
                for frame in packet.decode():  # the final empty packet flushes the decoder
                    first = frame.pts if first is None else first
                    chunks += [f.to_ndarray() for f in resampler.resample(frame)]
            chunks += [f.to_ndarray() for f in resampler.resample(None)]  # flush the resampler's delay
        except AV_ERRORS as e:
            raise DecodeError(path, f"audio decoding failed: {e}") from e
        # Packet ends are exact only where one tick is at most one sample (mp4/mov: 1/sample_rate).
        # webm/mkv count in ms; there the decoders already drop the padding that the container marks.
        exact = stream.time_base <= Fraction(1, stream.rate)
        stated = float((end - first) * stream.time_base) if exact and None not in (first, end) else None
    if not chunks:
        raise DecodeError(path, "audio stream decoded to no samples")
    wave = np.concatenate(chunks, axis=1).mean(axis=0)  # (L,)
    if stated is not None:
        wave = wave[: round(stated * sr)]  # drop the AAC encoder tail
    max_len = int(max_seconds * sr)
    if len(wave) > max_len:
        start = 0 if rng is None else int(rng.integers(0, len(wave) - max_len + 1))
        wave = wave[start : start + max_len]
    return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))


def _window(window_type: str, n: int, blackman_coeff: float) -> torch.Tensor:
    """Kaldi's window functions over n samples (float64, (n,)); a = 2 pi / (n - 1)."""
    i = torch.arange(n, dtype=torch.float64)
    a = 2 * math.pi / (n - 1)
    if window_type == "hanning":
        return 0.5 - 0.5 * torch.cos(a * i)
    if window_type == "hamming":
        return 0.54 - 0.46 * torch.cos(a * i)
    if window_type == "povey":  # a Hann window raised to 0.85: like Hamming but zero at the ends
        return (0.5 - 0.5 * torch.cos(a * i)).pow(0.85)
    if window_type == "rectangular":
        return torch.ones(n, dtype=torch.float64)
    if window_type == "blackman":
        return blackman_coeff - 0.5 * torch.cos(a * i) + (0.5 - blackman_coeff) * torch.cos(2 * a * i)
    raise ValueError(f"unknown window_type {window_type!r}")


def mel_banks(num_bins: int, n_fft: int, sr: float, low_freq: float, high_freq: float) -> torch.Tensor:
    """Kaldi's triangular mel filters -> float64 (num_bins, n_fft // 2 + 1).

    mel(f) = 1127 ln(1 + f / 700). Bin b has its left edge, centre and right edge at
    mel_low + (b, b + 1, b + 2) * (mel_high - mel_low) / (num_bins + 1). The weights are triangular in
    mel, not in Hz. FFT bin k sits at k * sr / n_fft. The Nyquist bin (k = n_fft / 2) always gets
    weight 0, as in Kaldi.
    """
    nyquist = 0.5 * sr
    high_freq = high_freq if high_freq > 0 else nyquist + high_freq  # <= 0 means an offset from Nyquist
    if not (0 <= low_freq < high_freq <= nyquist):
        raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist}, got {low_freq}, {high_freq}")

    def mel(f):
        return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)

    mel_low, mel_high = mel(low_freq), mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64)[:, None]  # (num_bins, 1)
    left, centre, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    m = mel(torch.arange(n_fft // 2, dtype=torch.float64) * (sr / n_fft))[None, :]  # (1, n_fft/2)
    up, down = (m - left) / (centre - left), (right - m) / (right - centre)
    weights = torch.where((m > left) & (m < right), torch.minimum(up, down), torch.zeros(()))  # (bins, n_fft/2)
    return torch.nn.functional.pad(weights, (0, 1))  # Nyquist column: weight 0


def fbank(
    wave: torch.Tensor,
    num_mel_bins: int = 64,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    sr: float = 16000,
    window_type: str = "povey",
    preemphasis: float = 0.97,
    dither: float = 0.0,
    remove_dc_offset: bool = True,
    round_to_power_of_two: bool = True,
    snip_edges: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    use_log_fbank: bool = True,
    use_power: bool = True,
    htk_compat: bool = False,
    use_energy: bool = False,
    energy_floor: float = 1.0,
    raw_energy: bool = True,
    subtract_mean: bool = False,
    blackman_coeff: float = 0.42,
    generator: torch.Generator = None,
) -> torch.Tensor:
    """Kaldi log-Mel filterbank of a 1-D wave -> (frames, num_mel_bins (+1 with use_energy)).

    Same options, defaults and semantics as torchaudio.compliance.kaldi.fbank (sr = its
    sample_frequency, preemphasis = its preemphasis_coefficient). The wave is used at its given scale
    (Kaldi expects int16 range). frame_length/frame_shift are in ms. Per frame, in Kaldi's order:
    dither -> remove DC -> raw log energy -> preemphasis -> window -> zero-pad to a power of two -> |rfft|
    (squared if use_power) -> mel filters -> log (floored at float eps). With use_energy the log energy
    is the first column, or the last with htk_compat. dither draws from `generator`.
    """
    if wave.dim() != 1:
        raise ValueError(f"expected a 1-D wave, got shape {tuple(wave.shape)}")
    dtype = wave.dtype
    eps = torch.finfo(torch.float32).eps  # Kaldi's log floor is float epsilon whatever the dtype
    # Kaldi computes sizes as int(sr * 0.001 * ms); the float rounding of that is part of the spec.
    shift, size = int(sr * 0.001 * frame_shift), int(sr * 0.001 * frame_length)
    n_fft = 2 ** math.ceil(math.log2(size)) if round_to_power_of_two else size
    n = wave.shape[0]

    # Framing. snip_edges: only frames that fit. Otherwise frame f is centred on f * shift + shift/2,
    # and samples outside [0, n) are mirrored with the edge sample repeated (-1 -> 0, n -> n - 1).
    if snip_edges:
        num_frames = 0 if n < size else 1 + (n - size) // shift
        first = 0
    else:
        num_frames = (n + shift // 2) // shift
        first = -(size // 2 - shift // 2)
    if num_frames == 0:
        return wave.new_zeros(0, num_mel_bins + int(use_energy))
    idx = first + shift * torch.arange(num_frames)[:, None] + torch.arange(size)[None, :]  # (F, size)
    idx = idx % (2 * n)
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
    x = wave[idx]  # (F, size)

    if dither != 0.0:
        x = x + dither * torch.randn(x.shape, generator=generator, dtype=dtype, device=x.device)
    if remove_dc_offset:
        x = x - x.mean(dim=1, keepdim=True)
    if use_energy and raw_energy:
        log_energy = x.pow(2).sum(dim=1).clamp_min(eps).log()  # (F,)
    if preemphasis != 0.0:
        # x[i] -= p * x[i-1], and x[0] -= p * x[0] (Kaldi treats the sample before the frame as x[0])
        x = x - preemphasis * torch.cat([x[:, :1], x[:, :-1]], dim=1)
    x = x * _window(window_type, size, blackman_coeff).to(dtype)
    if use_energy and not raw_energy:
        log_energy = x.pow(2).sum(dim=1).clamp_min(eps).log()

    spectrum = torch.fft.rfft(x, n=n_fft).abs()  # (F, n_fft/2 + 1), zero-padded to n_fft
    if use_power:
        spectrum = spectrum.pow(2)
    banks = mel_banks(num_mel_bins, n_fft, sr, low_freq, high_freq).to(dtype)  # (bins, n_fft/2 + 1)
    feats = spectrum @ banks.T  # (F, bins)
    if use_log_fbank:
        feats = feats.clamp_min(eps).log()

    if use_energy:
        if energy_floor > 0.0:
            log_energy = log_energy.clamp_min(math.log(energy_floor))
        parts = [feats, log_energy[:, None]] if htk_compat else [log_energy[:, None], feats]
        feats = torch.cat(parts, dim=1)
    if subtract_mean:
        feats = feats - feats.mean(dim=0, keepdim=True)
    return feats


def audio_features(wave_16k: torch.Tensor) -> torch.Tensor:
    """16 kHz mono wave in [-1, 1] (L,) -> float32 (998, 64): the official BEATs input.

    Frames past the end of the clip are 0 (zero rows appended after normalisation, as the official
    code does). That is the normalised value of an fbank equal to the mean, not of silence.
    """
    feats = fbank(wave_16k.float() * 2**15, num_mel_bins=64, frame_length=25.0, frame_shift=10.0, sr=16000)
    feats = (feats - FBANK_MEAN) / (2 * FBANK_STD)  # (F, 64)
    feats = feats[:NUM_FRAMES]
    return torch.nn.functional.pad(feats, (0, 0, 0, NUM_FRAMES - feats.shape[0]))  # (998, 64)
