"""Stage `compute-stats`: pixel mean/std of the training images and per-class counts.

    python stages/compute_stats.py --raw data/raw --out data/stats.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_pipeline.data import load_split
from mnist_pipeline.errors import run_stage
from mnist_pipeline.io import check_targets, write_json
from mnist_pipeline.stats import compute_stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="folder of the IDX files")
    parser.add_argument("--out", type=Path, required=True, help="statistics JSON to write")
    args = parser.parse_args(argv)

    check_targets(args.out)
    train_images, train_labels = load_split(args.raw, "train")
    _, test_labels = load_split(args.raw, "test")
    stats = compute_stats(train_images, train_labels, test_labels)
    write_json(args.out, stats)
    print(f"mean {stats['mean']:.4f}, std {stats['std']:.4f}, "
          f"{stats['train']['images']} train / {stats['test']['images']} test images")


if __name__ == "__main__":
    run_stage(main)
