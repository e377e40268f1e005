"""`uhd-show-slices` run from a checkout (`python launch/show_slices.py --help`): the program is uhd_jax/cli/show_slices.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout, without installing

from uhd_jax.cli.show_slices import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
