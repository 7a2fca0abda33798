"""The ``optimizer`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from optimizer.errors import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RESOURCE,
    EXIT_STAGE_ERROR,
    EXIT_USAGE,
    OptimizerError,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its one-line form
        self.exit(EXIT_USAGE, f"optimizer: error: {message} (see `optimizer --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="optimizer",
        description="Apply a recipe of optimization passes to a PyTorch checkpoint and measure every stage.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    from optimizer import __version__

    parser.add_argument("--version", action="version", version=f"optimizer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run a recipe", epilog=EXIT_CODES_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", type=Path, help="recipe YAML file")
    run.add_argument("--checkpoint", type=Path, help="checkpoint to use instead of model.checkpoint")
    run.add_argument("--out", type=Path, help="output folder (default: runs/<recipe name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a recipe value, e.g. --set stages.0.with.opset=17 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="print only the final table")

    validate = commands.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    commands.add_parser("passes", help="list the registered passes")
    commands.add_parser("schema", help="print the recipe JSON Schema")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from optimizer.progress import Progress
    from optimizer.report.terminal import stage_table
    from optimizer.runner import run_recipe

    progress = Progress(quiet=args.quiet)
    report = None
    error: OptimizerError | None = None
    try:
        report = run_recipe(args.recipe, checkpoint=args.checkpoint, out=args.out, overrides=args.overrides,
                            progress=progress)
    except OptimizerError as exc:
        # A gate or stage failure still wrote the report: show its table, then fail.
        report = getattr(exc, "report", None)
        if report is None:
            raise
        error = exc
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log file has no width limit worth wrapping a table for
    table, notes = stage_table(report.data)
    console.print(table)
    for note in notes:
        console.print(f"- {note}", highlight=False)
    console.print(f"report: {report.path / 'report.md'}" + (f"   artifact: {report.path / 'final'}" if report.passed else ""))
    if error is not None:
        raise error
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from optimizer.validate import validate_path

    for check in validate_path(args.recipe, args.overrides):
        print(f"ok  {check.what:<16} {check.detail}")
    print(f"{args.recipe}: valid")
    return EXIT_OK


def _cmd_passes(args: argparse.Namespace) -> int:
    from optimizer.registry import get_pass, pass_names

    rows = []
    for name in pass_names():
        try:
            cls = get_pass(name)
            rows.append((name, f"{'/'.join(cls.input_forms)} -> {cls.output_form}", cls.summary))
        except OptimizerError as exc:
            rows.append((name, "?", f"cannot load: {exc}"))
    width = max(len(r[0]) for r in rows)
    forms = max(len(r[1]) for r in rows)
    for name, io, summary in rows:
        print(f"{name:<{width}}  {io:<{forms}}  {summary}")
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from optimizer.recipe import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"run": _cmd_run, "validate": _cmd_validate, "passes": _cmd_passes, "schema": _cmd_schema}[args.command]
    try:
        return handler(args)
    except OptimizerError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"optimizer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("optimizer: interrupted; outputs of earlier runs are unchanged", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("optimizer: error: out of memory; lower batch sizes or sample counts", file=sys.stderr)
        return EXIT_RESOURCE
    except OSError as exc:
        if args.debug:
            raise
        import errno

        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"optimizer: error: disk full writing {exc.filename or 'output'}; free space and re-run",
                  file=sys.stderr)
            return EXIT_RESOURCE
        print(f"optimizer: error: {exc}", file=sys.stderr)
        return EXIT_STAGE_ERROR
