"""``python -m cellvpn.config server|client``: print the documented example config file."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cellvpn.config.example import render_example
from cellvpn.config.schema import KINDS


def main(argv: Sequence[str]) -> int:
    """Print the example file of the kind named on the command line."""
    if len(argv) != 1 or argv[0] not in KINDS:
        print("usage: python -m cellvpn.config server|client", file=sys.stderr)
        return 2
    sys.stdout.write(render_example(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
