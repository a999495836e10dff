"""The Triton backend: one file per op (attention.py, rms_norm.py, attn_pool.py, masked_gather.py) and
utils.py. Importing an op's file registers it with kernels (see kernels/__init__.py); kernels imports
them lazily, so `import kernels` never needs triton."""
