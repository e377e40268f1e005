"""`python -m uhd_jax.convert` is `uhd-convert`."""
import sys

from uhd_jax.convert.cli import main

sys.exit(main())
