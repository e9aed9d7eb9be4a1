"""``python -m lightning_prune.report SOURCE [--model ...] [--csv|--json|--plot PATH]``: the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lightning_prune.report.assemble import pruning_report
from lightning_prune.report.errors import ReportError
from lightning_prune.report.model import build_model, input_size_from_args
from lightning_prune.report.table import MACS_UNIT


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report of ``SOURCE`` and write the files asked for; exit code 2 for a file it cannot read."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        input_size = tuple(args.input_size) if args.input_size else None
        if input_size is not None and any(d < 1 for d in input_size):
            raise ReportError(f"--input-size takes positive sizes such as 3 32 32, got {list(input_size)}.")
        if args.model_args and not args.model:
            raise ReportError("--model-args needs --model CLASS_PATH.")
        model = None
        if args.model:
            model_args = _model_args(args.model_args)
            model = build_model(args.model, model_args)
            input_size = input_size or input_size_from_args(model_args)
        report = pruning_report(args.source, input_size=input_size, model=model)
        print(report.table())
        for path, write in ((args.csv, report.write_csv), (args.json, report.write_json), (args.plot, report.plot)):
            if path:
                write(path)
                print(f"wrote {path}")
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _model_args(text: str | None) -> dict:
    try:
        model_args = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise ReportError(f"--model-args is not valid JSON ({err}): write e.g. '{{\"num_classes\": 10}}'.") from None
    if not isinstance(model_args, dict):
        raise ReportError("--model-args must be a JSON object of keyword arguments.")
    return model_args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_prune.report",
        description="Pruning report of a lightning_prune checkpoint or export, one row per masked tensor "
        "(<module>.<param>): weights, kept weights, kept share, MACs ({}), budget asked and reached, the cut's "
        "validation metrics, and file sizes.".format(MACS_UNIT.replace("%", "%%")),
    )
    parser.add_argument(
        "source", help="a .ckpt of a run with BudgetCallback, pruned_backbone.pt or backbone_state_dict.pt"
    )
    parser.add_argument(
        "--model",
        metavar="CLASS_PATH",
        help="the backbone class, e.g. lightning_prune.backbones.Conv4 "
        "(default: from the config.yaml LightningCLI saved in the run's log dir)",
    )
    parser.add_argument(
        "--model-args", metavar="JSON", help="keyword arguments of --model, e.g. '{\"num_classes\": 10}'"
    )
    parser.add_argument(
        "--input-size",
        metavar="DIM",
        type=int,
        nargs="+",
        help="size of one input sample, e.g. 3 32 32 (default: from the model arguments or config.yaml, else 3 32 32)",
    )
    parser.add_argument("--csv", metavar="PATH", help="also write the rows and totals as CSV")
    parser.add_argument("--json", metavar="PATH", help="also write the whole report as JSON")
    parser.add_argument("--plot", metavar="PATH.png", help="also save a bar chart of the kept share per tensor")
    return parser
