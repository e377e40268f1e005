"""The command-line programs, one module each, installed as console scripts (setup.py `entry_points`) and run from a
checkout by the thin scripts in launch/: uhd-train, uhd-generate, uhd-evaluate, uhd-benchmark, uhd-demo,
uhd-check-data, uhd-show-slices; uhd-convert is uhd_jax.convert.cli."""
