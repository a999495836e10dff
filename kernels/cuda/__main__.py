"""The CUDA backend's command line:

    python -m kernels.cuda build [--arch 80,90a] [--cache DIR] [-v]  build ahead of time (else on first use)
    python -m kernels.cuda info [--arch 90a] [--cache DIR]           what is known without compiling: nvcc,
                                                                     targets, build key, cached or not (where),
                                                                     driver, devices, torch's CUDA
    python -m kernels.cuda selftest                                  one small call of every kernel, checked
                                                                     (the program compute-sanitizer runs)
The build is kernels/cuda/build.py, the ops and the selftest kernels/cuda/ops.py.
"""
import argparse
import sys
import time
from pathlib import Path

from . import build


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.cuda", description="Build and check the CUDA backend.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile csrc/ now (otherwise it happens on first use)")
    b.add_argument("--arch", help="e.g. 80,90a (default: $IVMINI_CUDA_ARCH or 80;90a)")
    b.add_argument("--cache", help="cache folder (default: $IVMINI_CUDA_CACHE or ~/.cache/ivmini/cuda)")
    b.add_argument("-v", "--verbose", action="store_true", help="print the compiler output")
    i = sub.add_parser("info", help="nvcc, targets, build key and whether it is cached, driver, devices, torch "
                                    "(compiles nothing)")
    i.add_argument("--arch", help="targets to compute the key for (default: as build)")
    i.add_argument("--cache", help="cache folder to look in (default: as build)")
    sub.add_parser("selftest", help="run every kernel once on a small case and check it (needs a GPU)")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        t0 = time.time()
        so = build.build(args.arch, args.cache, args.verbose)
        module = build.load(so)
        print(f"{so}\nbuilt or found in {time.time() - t0:.1f} s; imports; runtime: {module.runtime_info()}")
    elif args.cmd == "info":
        for name, value in info(args.arch, args.cache):
            print(f"{name + ':':13s} {value}")
    else:
        import torch
        if not torch.cuda.is_available():
            sys.exit("selftest needs a CUDA device")
        from . import ops
        failures = ops.selftest()
        print("selftest:", "ok" if not failures else f"FAILED: {failures}")
        sys.exit(1 if failures else 0)


def info(archs=None, cache=None):
    """(name, value) rows of what the backend knows without compiling: a cached build is loaded (to read the
    CUDA runtime linked into it), a missing one is only reported. A machine without a GPU gets
    "no CUDA device" and the reason the driver gives."""
    import torch
    rows, so = [], None
    archs = build.parse_archs(archs)
    try:
        nvcc = build.find_nvcc()
        rows.append(("nvcc", f"{nvcc} ({build.nvcc_version(nvcc)})"))
    except build.BuildError as e:
        nvcc = None
        rows.append(("nvcc", f"not found: {e}"))
    rows.append(("archs", ";".join(archs)))
    if nvcc:
        key = build.build_key(nvcc, archs)
        so = build.cached_module(key, cache)
        folder = (Path(cache) if cache else build.cache_dir()) / key
        rows += [("build key", key),
                 ("build", f"cached: {so}" if so else
                  f"not built yet (`python -m kernels.cuda build` compiles it into {folder})")]
    drv = build.driver_info()
    driver = [f"kernel module {drv['kernel_module']}"] if drv["kernel_module"] else []
    driver += [f"CUDA {drv['cuda']}"] if drv["cuda"] else []
    rows.append(("driver", ", ".join(driver) or "none found"))
    devices = ", ".join(f"{name} ({sm})" for name, sm in drv["devices"])
    rows.append(("devices", devices or f"no CUDA device ({drv['problem']})"))
    kind = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    rows.append(("torch", f"{torch.__version__}, {kind}; torch.cuda.is_available() = {torch.cuda.is_available()}"))
    if so:
        rt = build.load(so).runtime_info()
        seen = f"sees {rt['device_count']} device(s)" if rt["device_count"] else "sees no device"
        if drv["devices"] and not rt["device_count"]:     # a driver with devices, refused by this runtime: say why
            seen += f": {rt['device_error']}"
        runtime = build.cuda_version_str(rt["runtime_version"])
        rows.append(("runtime", f"CUDA {runtime} (linked into the build), {seen}"))
    return rows


if __name__ == "__main__":
    main()
