"""What every CLI shares: the parser (one-line parse errors), the ``--help`` formatter,
validating argparse types, the common flags (``--overwrite``, ``--amp``, ``--resume``) and
``call_reporting_errors``, the end of every ``main``."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.errors import InputError, ReportedError

__all__ = ["ArgumentParser", "HelpFormatter", "positive_int", "nonneg_int", "seed_int",
           "positive_float", "nonneg_float", "finite_float", "fraction", "probability",
           "MAX_MESSAGE", "one_line", "call_reporting_errors", "run_cli", "add_overwrite_flag",
           "AMP_CHOICES", "add_amp_flag", "add_resume_flag", "resume_path", "add_hu_flags",
           "check_hu_window", "add_verbosity_flag"]


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every CLI: a bad flag is one ``error: ...`` line and exit code 2, like the
    errors ``call_reporting_errors`` reports (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {one_line(message)}; see {self.prog} --help\n")


def _number(text: str, kind: type, test: Callable[[Any], bool], what: str) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if (kind is float and not math.isfinite(value)) or not test(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (sizes, counts, widths, epochs)."""
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0 (workers, borders)."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**63)."""
    return _number(text, int, lambda v: 0 <= v < 2**63, "a seed in [0, 2**63)")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates, spacings)."""
    return _number(text, float, lambda v: v > 0, "a finite number > 0")


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0 (loss weights, distances, weight decay)."""
    return _number(text, float, lambda v: v >= 0, "a finite number >= 0")


def finite_float(text: str) -> float:
    """argparse type: any finite number (HU window ends)."""
    return _number(text, float, lambda v: True, "a finite number")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1) (hold-out fractions, overlaps)."""
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _number(text, float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` formatter of every CLI: shows "(default: ...)" only where a default value
    exists (not for None, "", required options or on/off switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.required or action.default == "" \
                or action.default is argparse.SUPPRESS \
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help or ""
        return super()._get_help_string(action)


#: Longest error line printed; the middle of a longer message (a list of thousands of names,
#: say) is replaced by "... (N more characters) ...", keeping its start and the fix at its end.
MAX_MESSAGE = 600


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` as one readable line: an error re-raised from a DataLoader worker ("Caught
    InputError in DataLoader worker process 0. Original Traceback ...") becomes its original
    message, newlines become spaces, and a message over ``limit`` characters keeps its first
    two thirds and last third around "... (N more characters) ..."."""
    text = str(message).strip()
    if "Original Traceback" in text:  # torch.utils.data's ExceptionWrapper
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        text = re.sub(r"^[\w.]*(InputError|CheckpointError|Error): ", "", last)
    text = " ".join(text.split())
    if len(text) > limit:
        head, tail = (2 * limit) // 3, limit // 3
        text = f"{text[:head]} ... ({len(text) - head - tail} more characters) ... {text[-tail:]}"
    return text


def call_reporting_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """Call ``fn``; a ``ReportedError`` (bad input, a checkpoint that does not fit, a diverged
    run) and operating-system errors (read-only or full disk, missing permission: ``OSError``
    naming the path) become one ``error: ...`` line on stderr (see ``one_line``) and
    ``(False, None)``, so every CLI's ``main`` ends the same way (exit code 2, no traceback).
    Returns ``(True, result)`` otherwise."""
    try:
        return True, fn(*args, **kwargs)
    except ReportedError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return False, None
    except OSError as e:
        where = e.filename if e.filename is not None else "output"
        why = e.strerror or one_line(str(e))
        fix = "check that the path exists, is writable and the disk has free space"
        print(f"error: {one_line(f'{where}: {why}; {fix}')}", file=sys.stderr)
        return False, None


def run_cli(build_parser: Callable[[], argparse.ArgumentParser], run: Callable[..., Any],
            argv: list[str] | None = None,
            report: Callable[[argparse.Namespace, Any], int | None] | None = None,
            interrupted: str = "run it again to start over") -> int:
    """The one entry of every CLI's ``main``: parse ``argv``, call ``run(args)``, and return
    the exit code. A ``ReportedError`` or ``OSError`` is one ``error: ...`` line and exit code
    2 (``call_reporting_errors``); Ctrl-C is one ``interrupted; <interrupted>`` line and exit
    code 130, no traceback (what the run wrote so far is left as its atomic writes left it).
    ``report(args, result)``, when given, prints the result and may return another exit code.
    """
    args = build_parser().parse_args(argv)
    try:
        ok, result = call_reporting_errors(run, args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {interrupted}", file=sys.stderr)
        return 130
    if not ok:
        return 2
    code = report(args, result) if report is not None else None
    return 0 if code is None else int(code)


def add_overwrite_flag(group: Any, what: str) -> None:
    """``--overwrite``: the one flag that lets a run replace a finished result."""
    group.add_argument("--overwrite", action="store_true",
                       help=f"replace {what} of an earlier run in the output folder (without it "
                            "a finished result is kept and the run stops with an error)")


#: ``--amp`` values of every CLI: auto = bf16 autocast on CUDA and fp32 on CPU.
AMP_CHOICES = ("auto", "bf16", "fp32")


def add_amp_flag(group: Any, default: str = "auto", note: str = "") -> None:
    """``--amp {auto,bf16,fp32}``, the same in every CLI. The earlier switch form stays valid:
    ``--amp`` alone means auto (bf16 on CUDA, no effect on CPU, as the switch did) and
    ``--no-amp`` means fp32."""
    group.add_argument("--amp", nargs="?", const="auto", choices=AMP_CHOICES, default=default,
                       help="mixed precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16; "
                            f"fp32 (--amp alone: auto){note}")
    group.add_argument("--no-amp", dest="amp", action="store_const", const="fp32",
                       default=argparse.SUPPRESS, help="alias of --amp fp32")


def add_resume_flag(group: Any, last: str, what: str) -> None:
    """``--resume [PATH]``, the same in every CLI: continue an interrupted run from PATH, or
    without a value (or ``auto``) from the run's own last checkpoint ``last``."""
    group.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                       help=f"continue an interrupted run ({what}) from the checkpoint PATH; "
                            f"without a value (or 'auto') from {last}")


def resume_path(resume: str | None, last: str | os.PathLike) -> Path | None:
    """The checkpoint ``--resume`` names: None without it, ``last`` for ``auto``."""
    if not resume:
        return None
    return Path(last) if resume == "auto" else Path(resume)


def add_hu_flags(group: Any, what: str = "") -> None:
    """``--hu_min`` / ``--hu_max``: the HU window mapped to [0, 1] (``runtime.intensity``'s
    default [-1000, 1000]), the same two flags wherever a stage reads HU."""
    from runtime.intensity import HU_MAX, HU_MIN  # runtime.intensity imports torch; cli stays light
    group.add_argument("--hu_min", type=finite_float, default=HU_MIN,
                       help=f"HU mapped to 0, lower values clipped{what}")
    group.add_argument("--hu_max", type=finite_float, default=HU_MAX,
                       help=f"HU mapped to 1, higher values clipped{what}")


def check_hu_window(args: argparse.Namespace) -> None:
    """The cross-flag check of ``add_hu_flags``: ``--hu_max`` above ``--hu_min``."""
    if not args.hu_max > args.hu_min:
        raise InputError(f"--hu_min {args.hu_min:g} / --hu_max {args.hu_max:g}: --hu_max must be "
                         "greater than --hu_min")


def add_verbosity_flag(group: Any, levels: str = "1: progress bars and one line per epoch; "
                       "2: also details", default: int = 1) -> None:
    """``--verbose [N]``, the one verbosity flag of every CLI (0: errors and the final line
    only; ``--verbose`` alone: 2), and ``--quiet``, its alias for ``--verbose 0``."""
    group.add_argument("--verbose", type=int, nargs="?", const=2, default=default,
                       choices=[0, 1, 2], help=f"0: errors and the final line only; {levels} "
                                               "(--verbose alone: 2)")
    group.add_argument("--quiet", dest="verbose", action="store_const", const=0,
                       default=argparse.SUPPRESS, help="alias of --verbose 0")
