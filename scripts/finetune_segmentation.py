"""Stage 5: fine-tune the pretrained 3D U-Net for segmentation (the code: ``finetune.segmentation``; ``--help`` lists every flag)."""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root

from finetune import segmentation  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(segmentation.main())
