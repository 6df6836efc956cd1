"""Convert a published or foreign checkpoint to this project's schema (the code: ``models.convert``; ``--help`` lists every flag)."""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root

from models import convert  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(convert.main())
