"""Run the gRPC load generator without installing the package: the same as `afs loadtest`.

python scripts/loadtest.py --server 127.0.0.1:50051 --concurrency 16 --num-requests 200
"""

from __future__ import annotations

import sys
from pathlib import Path

# the repository root, so that `cluster` and `protos` import from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.loadtest import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
