"""`uhd-check-data` run from a checkout (`python launch/check_data.py --help`): the program is uhd_jax/cli/check_data.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout, without installing

# imports nothing heavy: the command restarts itself with huge pages (uhd_jax/cli/host_memory.py) first
from uhd_jax.cli.commands import check_data  # noqa: E402

if __name__ == "__main__":
    sys.exit(check_data())
