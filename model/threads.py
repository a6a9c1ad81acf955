"""The one OpenMP thread policy, applied by every entry point's main() (nothing sets it at import).

OpenMP threads wait for work by spinning. A short spin (GOMP_SPINCOUNT=20000, tens of microseconds)
keeps them awake between the ops of one forward pass (decode 1.6x faster than OMP_WAIT_POLICY=PASSIVE
on 2 cores) yet lets them sleep between steps, so they do not starve the HTTP thread or other
programs (docs/performance.md). An OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user wins.

libgomp reads these variables once, when the library is loaded, and `import torch` loads it (run
`OMP_DISPLAY_ENV=verbose python -c "import torch"`: the settings print during the import). So an entry
point calls `configure_threads()` before anything imports torch, and this module imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

SPIN_COUNT = "20000"
USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def configure_threads(threads: int | None = None) -> None:
    """Set the wait policy unless the user chose one, then torch's thread count when `threads` is given.

    Call it first in main(), before torch is imported: once torch is loaded the policy can no longer
    change, so then it only logs a warning (the thread count still applies). Calling it again is harmless.
    """
    if not any(name in os.environ for name in USER_KNOBS):
        if "torch" in sys.modules:
            log.warning(
                "torch was imported before configure_threads(): OpenMP keeps its default wait policy, not "
                "GOMP_SPINCOUNT=%s (set GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment instead)",
                SPIN_COUNT,
            )
        else:
            os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    if threads:
        import torch  # only now: the policy above must be in the environment when libgomp loads

        torch.set_num_threads(threads)
