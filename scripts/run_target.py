"""Fine-tune scratch and pretrained checkpoints on one of the paper's target tasks (NCC, NCS, LCS, BMS) and write the table beside the paper's (the code: ``target_tasks.run``; ``--help`` lists every flag)."""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root

from target_tasks import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run.main())
