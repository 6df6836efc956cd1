"""Fetch (or verify) the two real sample chest CTs (the code: ``preparation.sample_ct``; ``--help`` lists every flag)."""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root

from preparation import sample_ct  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(sample_ct.main())
