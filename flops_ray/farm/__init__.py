"""The Ray query farm: replica actors, their pool, the scheduler, the all-reduce, the Ray backend and a host for driver objects.

Only the modules in this package import ray; the maths (``engine``, ``step``, ``shards``) never does.
"""

import os

# Ray reads this when it is first imported, and every farm module imports ray after this package
# initialises: it keeps a local Ray (and clients of a loopback ``Cluster``) on 127.0.0.1, where
# sandboxes with only loopback would otherwise hang on the first connection (docs/DESIGN.md section 5).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
