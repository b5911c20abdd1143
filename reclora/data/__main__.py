"""python -m reclora.data [NAME] [--data-dir DIR] ...: loads a dataset and prints its statistics."""

import argparse

from reclora.data import SOURCES, load_dataset, print_statistics


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m reclora.data", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("name", nargs="?", default="synthetic", choices=list(SOURCES))
    parser.add_argument("--data-dir", help="the dataset's directory (default $RECLORA_DATA_DIR/NAME)")
    parser.add_argument(
        "--cache-dir", help="default: datasets/ in $RECLORA_CACHE_DIR, $XDG_CACHE_HOME/reclora or ~/.cache/reclora"
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--min-history", type=int, default=5)
    parser.add_argument("--label-threshold", type=float, default=3.0, help="label = rating > this")
    args = parser.parse_args()
    dataset = load_dataset(
        args.name,
        args.data_dir,
        min_history=args.min_history,
        label_threshold=args.label_threshold,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
    )
    print_statistics(dataset)


if __name__ == "__main__":
    main()
