"""Print what a quickstart run established and where its outputs are (the code: ``runtime.pipeline_summary``; ``--help`` lists every flag)."""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root

from runtime import pipeline_summary  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(pipeline_summary.main())
