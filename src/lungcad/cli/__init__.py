"""The ``lungcad`` command line.

Each subcommand is one module in this package that defines:

* ``NAME`` (the subcommand) and ``HELP`` (one line),
* ``add_arguments(parser: argparse.ArgumentParser) -> None``,
* ``run(args: argparse.Namespace) -> int`` (the exit code).

Modules are discovered automatically, so adding a subcommand means adding one file. Heavy
imports (torch, MONAI, ...) belong inside ``run`` so ``lungcad --help`` stays fast.

Bad input (``ValueError`` / ``FileNotFoundError``, which lungcad's own errors subclass) is
reported as one line naming the file and the problem, with exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

from lungcad import __version__

log = logging.getLogger("lungcad")

EXIT_BAD_INPUT = 2
_CHATTY_LIBRARIES = ("highdicom", "httpx", "httpcore", "radiomics", "PIL", "matplotlib")


def _subcommand_modules() -> list[ModuleType]:
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            modules.append(module)
    return modules


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per discovered subcommand module."""
    parser = argparse.ArgumentParser(
        prog="lungcad",
        description="Lung-cancer CAD for chest CT: prepare, train, evaluate, predict, serve.",
    )
    parser.add_argument("--version", action="version", version=f"lungcad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _subcommand_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def configure_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps; the only place lungcad configures logging."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # Libraries that narrate every step at INFO (highdicom copies each DICOM module, httpx
    # logs each request); their warnings still show, their chatter only with --verbose.
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lungcad`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    configure_logging(args.verbose)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        if args.debug:
            raise
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
