"""``python -m probe._sweep_worker SPEC.json``: one process of a sweep started by :func:`probe.record.sweep.launch`.

A module of its own because ``probe.record.sweep`` is imported with the package, and running an imported module as
``__main__`` would load it twice.
"""

import sys

from probe.record.sweep import main

if __name__ == "__main__":
    sys.exit(main())
