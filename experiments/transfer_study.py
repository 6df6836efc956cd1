"""Transfer study: pretrain Semantic Genesis and its ablations on the same patterns, fine-tune
every method on phantom target tasks over label fractions and seeds (paired), and report a
JSON, a table and a plot (the code: ``experiments.transfer``; ``--help`` lists every flag).

    python experiments/transfer_study.py --preset cpu --output_dir outputs/transfer_study_cpu
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from experiments.transfer.study import build_parser, main, run  # noqa: E402

__all__ = ["build_parser", "run", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
