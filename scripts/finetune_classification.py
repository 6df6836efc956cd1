"""Stage 5: fine-tune a pretrained encoder for 3D cube classification (the code: ``finetune.classification``; ``--help`` lists every flag)."""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root

from finetune import classification  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(classification.main())
