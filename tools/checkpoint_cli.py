"""Shared command line of tools/convert_deformable_detr.py and tools/convert_torchvision_resnet.py,
and, run by itself, the writer of a model's weights as ``.safetensors`` (the format for sharing):

    python tools/checkpoint_cli.py to-safetensors output/model_final.pth model.safetensors \
        --config-file configs/ISDA-Demo.yaml

The mapping tables and the conversion live in the installed package (``isda.conversion``); this
file builds the target model from a config, parses arguments, prints the report and sets the exit
status: 0 written, 1 problems and nothing written, 2 unreadable or unknown file. A converter's
output path ending in ``.safetensors`` is written in that format too.
"""

import argparse
import sys
from typing import Dict, Sequence, Tuple

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from isda import add_isda_config
from isda.conversion import (
    CheckpointFormatError,
    ConversionReport,
    convert,
    detect_format,
    extract_state_dict,
    load_source,
    save_converted,
    source_formats,
)
from isda.conversion.rules import SourceFormat
from isda.weights import WeightsError, check_complete, save_safetensors

Shape = Tuple[int, ...]
# A checkpoint written by Detectron2's trainer (or any file with the model under "model").
TRAINED_MODEL = SourceFormat("trained", "weights under 'model'", "model", "", [])


def target_shapes_from_config(config_file: str, opts: Sequence[str] = ()) -> Dict[str, Shape]:
    """Builds ISDA on CPU from a config and returns its state-dict layout (no weights loaded)."""
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def argument_parser(formats: Sequence[str], description: str) -> argparse.ArgumentParser:
    """The options both conversion scripts share."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="checkpoint to convert")
    parser.add_argument("output", help="converted .pth for MODEL.WEIGHTS")
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", *formats],
        help="source layout (default: detect)",
    )
    parser.add_argument(
        "--config-file",
        default="configs/Base-ISDA.yaml",
        help="ISDA config that defines the target model (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="write the file even if keys are missing, unmapped or of the wrong shape",
    )
    parser.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="load with weights_only=False (only for files you trust; also ISDA_UNSAFE_PICKLE=1)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary and problems")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def run_conversion(
    args: argparse.Namespace, formats: Sequence[str]
) -> Tuple[ConversionReport, bool]:
    """Loads, converts and (unless there are errors and no --allow-partial) writes. Returns the
    report and whether a file was written."""
    obj = load_source(args.source, allow_unsafe_pickle=True if args.unsafe_pickle else None)
    fmt = detect_format(obj) if args.format == "auto" else source_formats()[args.format]
    if fmt.name not in formats:
        raise CheckpointFormatError(
            f"{args.source} looks like '{fmt.name}', this tool reads {list(formats)}"
        )
    source = extract_state_dict(obj, fmt)
    target = target_shapes_from_config(args.config_file, args.opts)
    state, report = convert(source, fmt, target)
    if report.ok or args.allow_partial:
        save_converted(args.output, state, report)
        return report, True
    return report, False


def main(argv: Sequence[str], formats: Sequence[str], description: str) -> int:
    """Runs one conversion; returns the exit status (see the module docstring)."""
    args = argument_parser(formats, description).parse_args(argv)
    try:
        report, written = run_conversion(args, formats)
    except (CheckpointFormatError, WeightsError) as e:
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


def to_safetensors(argv: Sequence[str]) -> int:
    """``to-safetensors SOURCE OUTPUT [--config-file CFG] [KEY VALUE ...]``: writes the model
    weights of SOURCE (any file MODEL.WEIGHTS reads) as OUTPUT.safetensors. With a config, the
    file must hold every tensor of that model, with its shape. Exit status as for conversions."""
    parser = argparse.ArgumentParser(prog="checkpoint_cli.py to-safetensors")
    parser.add_argument("source", help="checkpoint whose 'model' weights are written")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--config-file", help="refuse weights incomplete for this config's model")
    parser.add_argument("--unsafe-pickle", action="store_true", help="trusted pickles only")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE ...")
    args = parser.parse_intermixed_args(argv)
    if not args.output.endswith(".safetensors"):
        parser.error(f"output {args.output!r} must end in .safetensors")
    try:
        obj = load_source(args.source, allow_unsafe_pickle=True if args.unsafe_pickle else None)
        state = extract_state_dict(obj, TRAINED_MODEL)
        if args.config_file:
            target = target_shapes_from_config(args.config_file, args.opts)
            missing = [k for k in target if k not in state]
            mismatched = [k for k in target if k in state and tuple(state[k].shape) != target[k]]
            check_complete(args.source, list(target), missing, mismatched)
        save_safetensors(state, args.output)
    except (CheckpointFormatError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {len(state)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["to-safetensors"]:
        sys.exit("usage: checkpoint_cli.py to-safetensors SOURCE OUTPUT [--config-file CFG]")
    sys.exit(to_safetensors(sys.argv[2:]))
