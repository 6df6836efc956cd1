"""Write synthetic chest CT phantoms (for trying the pipeline without data) (the code: ``preparation.phantoms``; ``--help`` lists every flag)."""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root

from preparation import phantoms  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(phantoms.main())
