#!/usr/bin/env python
"""Convert a dataset into WebDataset shards with a manifest.

    python tools/make_shards.py vtab --root vtab-1k/kitti --out shards/kitti --image-size 224
    python tools/make_shards.py fgvc --root CUB_200_2011 --out shards/cub --image-size 256
    python tools/make_shards.py imagefolder --root my_data --out shards/my_data
    python tools/make_shards.py idx --root /usr/share/datasets/fashion-mnist --out shards/fmnist \
        --subset train=1000 --val-split 200 --subset test=3000

FORMAT: vtab (NOAH VTAB-1k folder: train800/val200/train800val200/test .txt), fgvc (VPT json splits),
imagefolder (<root>/<split>/<class>/<image>), idx (MNIST-style IDX files).
"""
import argparse
import sys

from rlrr.cli import tool_main
from rlrr.data.shards import select_splits, write_shards
from rlrr.data.sources import READERS, DatasetError


def _subset(text: str) -> tuple[str, int]:
    split, _, n = text.partition("=")
    if not split or not n.isdigit():
        raise argparse.ArgumentTypeError(f"expected SPLIT=N, got {text!r}")
    return split, int(n)


@tool_main("make_shards", errors=(DatasetError, FileExistsError, OSError))
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("format", choices=sorted(READERS))
    ap.add_argument("--root", required=True, help="source dataset folder")
    ap.add_argument("--out", required=True, help="output folder (refused if not empty, unless --overwrite)")
    ap.add_argument("--image-size", type=int, help="resize to N x N (or shorter side N with --resize shorter), bicubic")
    ap.add_argument("--resize", choices=("square", "shorter"), default="square")
    ap.add_argument("--encoding", choices=("auto", "jpg", "png"), default="auto",
                    help="auto: keep jpg/png files as they are unless resized; re-encode others as jpg (IDX: png)")
    ap.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    ap.add_argument("--workers", type=int, default=1, help="parallel encoding processes")
    ap.add_argument("--num-classes", type=int, help="declared class count; labels must lie in [0, N)")
    ap.add_argument("--class-names", help="comma-separated class names (replaces the numeric defaults)")
    ap.add_argument("--name", help="dataset name in the manifest (default: the root folder's name)")
    ap.add_argument("--subset", type=_subset, action="append", default=[], metavar="SPLIT=N",
                    help="keep a seeded random N samples of SPLIT")
    ap.add_argument("--val-split", type=int, default=0, metavar="N",
                    help="carve a 'val' split of N samples out of 'train' (adds 'trainval' = the original train)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    source = READERS[args.format](args.root, args.num_classes)
    if args.name:
        source.name = args.name
    if args.class_names:
        names = [n.strip() for n in args.class_names.split(",")]
        if len(names) != len(source.class_names):
            raise DatasetError(f"--class-names: {len(names)} names for {len(source.class_names)} classes")
        source.class_names = names
    select_splits(source, dict(args.subset), args.val_split, args.seed)
    manifest = write_shards(source, args.out, image_size=args.image_size, resize=args.resize, fmt=args.encoding,
                            shard_size=args.shard_size, workers=args.workers, strict=args.strict,
                            overwrite=args.overwrite, progress=not args.no_progress)
    counts = ", ".join(f"{s} {v['num_samples']} ({len(v['shards'])} shards)" for s, v in manifest["splits"].items())
    print(f"wrote {args.out}: {manifest['num_classes']} classes; {counts}; {len(manifest['skipped'])} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
