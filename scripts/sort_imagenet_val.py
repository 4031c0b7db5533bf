#!/usr/bin/env python
"""Sort ImageNet's flat validation folder into `val/<wnid>/` from the devkit's ground truth.

Usage: python scripts/sort_imagenet_val.py --val data/imagenet/val --devkit ILSVRC2012_devkit_t12
"""

from __future__ import annotations

import argparse
import sys

from kron.data.errors import DatasetError
from kron.data.imagenet import sort_val


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val", required=True, help="folder holding ILSVRC2012_val_*.JPEG")
    parser.add_argument("--devkit", required=True,
                        help="extracted ILSVRC2012_devkit_t12 (or its data/ folder)")
    parser.add_argument("--dry-run", action="store_true", help="count, move nothing")
    args = parser.parse_args(argv)
    try:
        n = sort_val(args.val, args.devkit, dry_run=args.dry_run)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only or full val folder: say which path, not a traceback
        print(f"error: ImageNet: cannot move into {err.filename or args.val} "
              f"({err.strerror or err}); make the val folder writable and run again (a re-run "
              "moves only what is left).", file=sys.stderr)
        return 2
    print(f"{'would move' if args.dry_run else 'moved'} {n} images into class folders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
