"""Prepare a target task (NCC, NCS, LCS, BMS) from its public dataset (the code: ``target_tasks.prepare``; ``TASK --help`` lists every flag)."""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root

from target_tasks import prepare  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(prepare.main())
