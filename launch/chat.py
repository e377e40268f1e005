"""`uhd-chat` run from a checkout (`python launch/chat.py --help`): the program is uhd_jax/cli/chat.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout, without installing

# imports nothing heavy: the command restarts itself with huge pages (uhd_jax/cli/host_memory.py) first
from uhd_jax.cli.commands import chat  # noqa: E402

if __name__ == "__main__":
    sys.exit(chat())
