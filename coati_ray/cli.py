"""The one CLI layer: flags -> config dataclasses -> a library call, and clean user errors.

Errors the user caused (`CoatiError`: a bad flag, file, row, model path) print one message and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from coati_ray.errors import CoatiError
from coati_ray.runtime import quiet_libraries

T = TypeVar("T")
logger = logging.getLogger("coati_ray")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()


def parse(dataclasses: Sequence[type], argv: Sequence[str] | None, description: str,
          positional: Sequence[tuple[str, str]] = (), local_flag: bool = True):
    """Parse flags into one instance of each dataclass (field names are the flag names).

    `positional`: optional (name, help) positional arguments, returned on the extra namespace.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(dataclasses), description=description)
    for name, text in positional:
        parser.add_argument(name, nargs="?", default=None, help=text)
    if local_flag:
        parser.add_argument("--local", action="store_true",
                            help="Run the single trainer in this process instead of as a Ray actor (debugging).")
    argv = _bare_resume_means_auto(list(sys.argv[1:] if argv is None else argv))
    *parts, extra = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False,
                                                      look_for_args_file=False, args_file_flag=None)
    return parts, extra


def _bare_resume_means_auto(argv: list[str]) -> list[str]:
    """`--resume` with no value (the flag's older, boolean form) means `--resume auto`."""
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("auto")
    return out


def run_main(fn: Callable[[], T]) -> T:
    """Run `fn`, turning user errors into one clear line and exit status 2.

    Errors raised inside Ray actors arrive here already unwrapped (see `TrainerGroup._call`).
    """
    try:
        return fn()
    except CoatiError as e:
        logger.error("error: %s", e)
        sys.exit(2)
