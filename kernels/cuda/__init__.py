"""The CUDA C++ backend (csrc/): build.py compiles it on first use (ninja + nvcc, cached), ops.py checks
arguments, launches the kernels and registers the four ops as torch custom ops; `python -m kernels.cuda`
is the command line (build, info, selftest). kernels/__init__.py imports kernels.cuda.ops on first use."""
