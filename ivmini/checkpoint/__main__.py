"""python -m ivmini.checkpoint export RUN OUT: a training run (or one checkpoints/step_* folder) -> one file
in the official layout of its stage (stage 1: PretrainInternVideo2; stage 2: InternVideo2_Stage2_visual),
loadable with load_official without torch.distributed."""
import argparse
import os

from .internvideo2 import export


def main(argv=None):
    ap = argparse.ArgumentParser(description="ivmini checkpoint tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="sharded training checkpoint -> one file in the official layout of its stage")
    ex.add_argument("ckpt", help="a checkpoints/step_* directory, or a run folder (its newest checkpoint)")
    ex.add_argument("out", help="output file: .pt (plain state dict) or .safetensors")
    args = ap.parse_args(argv)
    path, kind, kwargs = export(args.ckpt, args.out)
    print(f"exported {path} -> {args.out} ({os.path.splitext(args.out)[0]}.json holds the load_official arguments)")
    print("load it with: from ivmini.checkpoint import load_official; "
          f"load_official({kind!r}, {args.out!r}, **json.load(open(...))['kwargs'])")

if __name__ == "__main__":
    main()
