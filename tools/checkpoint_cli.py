"""Shared command line of tools/convert_deformable_detr.py and tools/convert_torchvision_resnet.py.

The mapping tables and the conversion live in ``isda.checkpoint``; this file only parses arguments,
prints the report and sets the exit status: 0 written, 1 problems and nothing written, 2 unreadable
or unknown file.
"""

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import isda  # noqa: F401
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, os.path.join(REPO_ROOT, "projects", "ISDA"))

from isda.checkpoint import CheckpointFormatError, add_cli_arguments, run_conversion  # noqa: E402


def main(argv, formats, description: str) -> int:
    """Runs one conversion; see ``add_cli_arguments`` for the options."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_cli_arguments(parser, formats)
    args = parser.parse_args(argv)
    try:
        report, written = run_conversion(args, formats)
    except CheckpointFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format(full=not args.quiet))
    if written:
        print(f"Wrote {args.output}" + ("" if report.ok else " (PARTIAL: see the problems above)"))
        return 0
    print(
        f"error: {len(report.errors())} problems, nothing written; --allow-partial writes the keys "
        "that did convert",
        file=sys.stderr,
    )
    return 1
