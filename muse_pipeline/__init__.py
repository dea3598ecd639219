"""muse-pipeline: MUSE text-video retrieval as a staged pipeline (extract -> train -> evaluate/search)."""

import os as _os

# torch and numba (the CPU scan) each run an OpenMP thread pool; with the default ACTIVE policy the
# idle pool spins and takes the other's cores. Measured on 2 cores (load ~5): a muse head step
# 6.2 s -> 2.1 s, a muse-transformer step 2.9 s -> 1.1 s. Only effective before the OpenMP runtime
# starts (the first torch import), hence here; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
