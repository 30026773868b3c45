"""``python -m jdm_fast.experiments compare ...`` (see ``compare --help``)."""
from __future__ import annotations

import argparse
import sys

from jdm_fast.experiments import compare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jdm_fast.experiments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    compare.add_arguments(sub.add_parser("compare", help=compare.__doc__.splitlines()[0],
                                         description=compare.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        return compare.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
