"""What the command lines share: an argument parser whose ``--help`` shows every default, and whose
errors — like the scripts' own — are one line, ``error: <what is wrong and how to fix it>``, on
stderr with exit status 2, raised before any work is done."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["ArgumentParser", "command_line", "fail", "EXIT_USAGE"]

EXIT_USAGE = 2  # bad input: argparse's convention


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and "(default: …)" after every option's help."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with defaults in ``--help`` and one-line errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def command_line(script: str, argv=None) -> str:
    """The call of ``analysis_scripts/SCRIPT`` that a result records as what made it: ``argv`` when
    ``main(argv)`` is called in-process (a test, a notebook), else the process's own arguments."""
    return f"python analysis_scripts/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
