"""`uhd-benchmark` run from a checkout (`python launch/benchmark.py --help`): the program is uhd_jax/cli/benchmark.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout, without installing

from uhd_jax.cli.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
