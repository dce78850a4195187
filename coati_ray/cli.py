"""The one CLI layer: flags -> config dataclasses -> a library call, and clean user errors.

Errors the user caused (`CoatiError`: a bad flag, file, row, model path) print one message and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from coati_ray.config_file import ConfigFileError, file_defaults, split_config_flag
from coati_ray.errors import CoatiError
from coati_ray.runtime import quiet_libraries

T = TypeVar("T")
logger = logging.getLogger("coati_ray")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()


def parse(dataclasses: Sequence[type], argv: Sequence[str] | None, description: str,
          positional: Sequence[tuple[str, str]] = (), local_flag: bool = False,
          check: Callable[[list], str | None] | None = None, defaults: dict | None = None):
    """Parse flags into one instance of each dataclass (field names are the flag names).

    Every launcher goes through here, so `--help` and flag errors look the same everywhere: an
    unknown flag, a value of the wrong type or an invalid choice prints the usage line and one
    `<prog>: error: ...` line and exits with status 2 (argparse's convention).

    `positional`: optional (name, help) positional arguments, returned on the extra namespace.
    `local_flag`: add `--local` (run the single trainer in this process; stages 1 and 2).
    `check(parts)`: a usage rule across flags; the message it returns is reported the same way.
    `defaults`: this launcher's own defaults for some fields (shown by --help too).
    Returns (instances in the order of `dataclasses`, namespace of the positionals and --local).
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(dataclasses), description=description, formatter_class=HelpFormatter)
    for name, text in positional:
        parser.add_argument(name, nargs="?", default=None, help=text)
    if local_flag:
        parser.add_argument("--local", action="store_true",
                            help="Run the single trainer in this process instead of as a Ray actor (debugging).")
    if defaults:
        parser.set_defaults(**defaults)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of flag: value lines (flag names "
                        "without --); flags on the command line override it. A run's save_path/config.yaml is one.")
    explain_negations(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config_path, argv = split_config_flag(argv)
        if config_path:
            values = file_defaults(parser, config_path)
            for action in parser._actions:
                if action.dest in values:
                    action.required = False  # the file gave it
            parser.set_defaults(**values)
    except ConfigFileError as e:
        parser.error(str(e))
    if "--resume" in parser._option_string_actions:
        argv = _bare_resume_means_auto(argv)
    *parts, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                        look_for_args_file=False, args_file_flag=None)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # HfArgumentParser appends the namespace of the non-dataclass arguments only when there are some
    extra = parts.pop() if len(parts) > len(dataclasses) else argparse.Namespace()
    vars(extra).pop("config", None)  # read above
    if check is not None and (message := check(parts)):
        parser.error(message)
    return parts, extra


def _bare_resume_means_auto(argv: list[str]) -> list[str]:
    """`--resume` with no value (the flag's older, boolean form) means `--resume auto`."""
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("auto")
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (launchers pass their docstring); a flag's help gets `(default: X)`
    unless it has no default worth showing (None, a switch) or its text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default in (None, argparse.SUPPRESS) or action.nargs == 0
                or re.search(r"\bdefault[:\s]", text, re.IGNORECASE)):  # "default: X", "default X"
            return text
        return super()._get_help_string(action)


def explain_negations(parser: argparse.ArgumentParser) -> None:
    """HfArgumentParser gives a bool field that defaults to True a `--no_X` flag whose help is a
    copy of `--X`'s; say what it does instead ("Whiten ..." -> "Do not whiten ...")."""
    positive = {a.dest: a for a in parser._actions if not isinstance(a, argparse._StoreFalseAction)}
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            text = (positive[action.dest].help if action.dest in positive else "") or ""
            if text and not text[1:2].isupper():  # keep an acronym's capitals ("GAE ...")
                text = text[0].lower() + text[1:]
            action.help = f"Do not {text}" if text else f"Turn --{action.dest} off."
            action.default = argparse.SUPPRESS  # --X's default (True) is the one that counts


def finish(code: int = 0) -> NoReturn:
    """End a launcher whose work is done: wait for its threads, run the exit handlers (Ray's shutdown,
    the trackers', logging's), flush, and leave without Python tearing down every imported module
    one by one (torch, transformers, Ray: 1-2 s of a short run, bench_peer.py's whole-run time)."""
    import atexit
    import os
    import threading

    threading._shutdown()  # what the interpreter does first at exit: non-daemon threads finish
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_main(fn: Callable[[], T]) -> T:
    """Run `fn`, turning user errors into one clear line and exit status 2.

    Errors raised inside Ray actors arrive here already unwrapped (see `TrainerGroup._call`).
    """
    try:
        return fn()
    except CoatiError as e:
        logger.error("error: %s", e)
        sys.exit(2)
