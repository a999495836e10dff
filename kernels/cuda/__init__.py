"""The CUDA C++ backend (csrc/): ops.py builds it on first use and registers the four ops."""
