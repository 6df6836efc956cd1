"""Stage 0: prepare CT scans as the pipeline's volumes (the code: ``preparation.prepare``; ``--help`` lists every flag)."""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root

from preparation import prepare  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(prepare.main())
