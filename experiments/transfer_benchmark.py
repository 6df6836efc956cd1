"""Transfer benchmark: the transfer study's phantom target tasks fine-tuned from scratch and
from one checkpoint over several seeds, as a scratch-vs-pretrained table (the code:
``experiments.transfer.benchmark``; ``--help`` lists every flag).

    python experiments/transfer_benchmark.py --weights Checkpoints/en_de/semantic_genesis_chest_ct.pt \\
        --seeds 0 1 2 --tasks classification segmentation
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from experiments.transfer.benchmark import (build_parser, format_table, main, run,  # noqa: E402
                                            summarize)

__all__ = ["build_parser", "run", "main", "summarize", "format_table"]

if __name__ == "__main__":
    raise SystemExit(main())
