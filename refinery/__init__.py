"""refinery: the Dagster-free domain package (one module per stage)."""

import os

__version__ = "0.1.0"

# numba's threading layer for the compiled parallel kernels: GNU OpenMP, its pick on Linux without
# TBB, kills every process forked after a parallel kernel ran, and the data stage forks its map
# workers (refinery.parallel). "forksafe" takes TBB when installed, else numba's workqueue. A
# choice already made in the environment stands.
os.environ.setdefault("NUMBA_THREADING_LAYER", "forksafe")
