"""Data: decoding, features, augmentation and datasets for all three stages.

Modules:
  video      - frame sampling (official `get_frame_indices`) and PyAV decoding of the sampled frames;
               only real videos are videos (not text, pictures, single frames or non-regular files)
  audio      - PyAV audio decoding to 16 kHz mono, a pure-torch Kaldi fbank, the BEATs input features
  transforms - the train/test image transforms of the official pipelines
  datasets   - annotation formats (json/csv) of the official repo turned into torch Datasets
  sampling   - per-rank resumable samplers (plain, and one media type per batch) and the DataLoader
  synthetic  - the embedded synthetic video-audio-text world (DESIGN.md §4)

Heavy modules are not imported here; import them by name (`from ivmini.data import video`).
"""
from ivmini.data.video import DecodeError

__all__ = ["DecodeError"]
