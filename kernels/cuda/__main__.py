"""The CUDA backend's command line:

    python -m kernels.cuda build [--arch 80,90a] [--cache DIR] [-v]   build ahead of time (else on first use)
    python -m kernels.cuda info                                      key, path, CUDA runtime and driver
    python -m kernels.cuda selftest                                  one small call of every kernel, checked
                                                                     (the program compute-sanitizer runs)
The build is kernels/cuda/build.py, the ops and the selftest kernels/cuda/ops.py.
"""
import argparse
import json
import sys
import time

from . import build


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.cuda", description="Build and check the CUDA backend.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile csrc/ now (otherwise it happens on first use)")
    b.add_argument("--arch", help="e.g. 80,90a (default: $IVMINI_CUDA_ARCH or 80;90a)")
    b.add_argument("--cache", help="cache folder (default: $IVMINI_CUDA_CACHE or ~/.cache/ivmini/cuda)")
    b.add_argument("-v", "--verbose", action="store_true", help="print the compiler output")
    sub.add_parser("info", help="the build key, the module path and the CUDA runtime/driver seen by it")
    sub.add_parser("selftest", help="run every kernel once on a small case and check it (needs a GPU)")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        t0 = time.time()
        so = build.build(args.arch, args.cache, args.verbose)
        module = build.load(so)
        print(f"{so}\nbuilt or found in {time.time() - t0:.1f} s; imports; runtime: {module.runtime_info()}")
    elif args.cmd == "info":
        nvcc, archs = build.find_nvcc(), build.parse_archs()
        print(json.dumps(dict(nvcc=nvcc, archs=archs, key=build.build_key(nvcc, archs), cache=str(build.cache_dir()),
                              runtime=build.ext().runtime_info()), indent=1))
    else:
        import torch
        if not torch.cuda.is_available():
            sys.exit("selftest needs a CUDA device")
        from . import ops
        failures = ops.selftest()
        print("selftest:", "ok" if not failures else f"FAILED: {failures}")
        sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
