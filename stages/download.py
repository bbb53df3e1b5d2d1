"""Stage `download`: fetch the four MNIST files, verify them, store them decompressed in --out.

Mirrors: $MNIST_MIRROR (a folder holding the .gz files, or an http(s):// or file:// base
address), then the public mirrors torchvision uses (MNIST_PUBLIC_MIRRORS=0 skips them).
    python stages/download.py --out data/raw
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mnist_pipeline.download import download, mirrors_from_env
from mnist_pipeline.errors import run_stage
from mnist_pipeline.io import repo_root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the IDX files")
    parser.add_argument("--mirror", help="a mirror to try first (overrides $MNIST_MIRROR)")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    if args.mirror:
        env["MNIST_MIRROR"] = args.mirror
    served = download(args.out, mirrors_from_env(env, base=repo_root(env, Path.cwd())))
    for name, mirror in served.items():
        print(f"{name}: verified, from {mirror}")


if __name__ == "__main__":
    run_stage(main)
