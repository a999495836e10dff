"""ivmini: a compact InternVideo2 with hand-written Triton and CUDA kernels.

Installs two top-level packages, `ivmini` (model + training library) and `kernels` (the ops).
Nothing is compiled at install time: the CUDA extension in csrc/ is built on first use.
torch is not pinned here so that a CPU-only machine can install the CPU build first
(`pip install torch==2.13.0`); see README.md.
"""
from setuptools import find_packages, setup

setup(
    name="ivmini",
    version="0.1.0",
    description="Compact InternVideo2 reimplementation with Triton/CUDA kernels and an FSDP2 trainer",
    packages=find_packages(include=["ivmini", "ivmini.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",        # SDPA with enable_gqa (the torch backend)
        "triton>=3.2",
        "numpy",
        "einops",
        "pybind11",
        "ninja",
        "sentencepiece",
        "tqdm",
        "av",            # PyAV: video/audio decoding
        "safetensors",   # reading .safetensors checkpoints
    ],
    extras_require={"test": ["pytest"]},
)
