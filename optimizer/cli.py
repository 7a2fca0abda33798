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
    Interrupted,
    OptimizerError,
    RecipeError,
    is_disk_full,
    one_line,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its one-line form
        self.exit(EXIT_USAGE, f"optimizer: error: {one_line(message)} (see `optimizer --help`)\n")


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
    run.add_argument("--resume", action="store_true",
                     help="reuse stages an earlier run finished (same inputs, settings, libraries and machine) "
                          "instead of recomputing them; cached files that changed are recomputed")
    run.add_argument("--cache", type=Path, metavar="DIR",
                     help="stage cache folder, shareable between output folders (default: OUT/.cache)")

    search = commands.add_parser(
        "search", help="search the recipe's search: space for the best artifact within its budgets",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    search.add_argument("recipe", type=Path, help="recipe YAML file with a search: section")
    search.add_argument("--out", type=Path, required=True, help="search folder (study journal, trials, final/)")
    search.add_argument("--trials", type=int, help="trials in the study, counting those of a resumed search "
                                                   "(default: search.trials)")
    search.add_argument("--timeout", type=float, metavar="MIN", help="start no new trial after this many minutes")
    search.add_argument("--workers", type=int, default=1, help="trials run at once (default 1)")
    search.add_argument("--ray", metavar="ADDRESS|local",
                        help="run trials as Ray tasks: 'local' starts a Ray on this machine, else the address of a "
                             "running cluster ('auto', ray://HOST:10001); needs optimizer[ray]")
    search.add_argument("--resume", action="store_true", help="continue the search in --out")
    search.add_argument("--cache", type=Path, metavar="DIR",
                        help="stage cache the trials share, shareable with optimizer run --cache (default: OUT/.cache)")
    search.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe value, e.g. --set budget.latency_p50_ms=0.1 (repeatable)")
    search.add_argument("--quiet", action="store_true", help="print only the result")

    validate = commands.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    report = commands.add_parser("report", help="re-render report.md and report.html from a run's report.json")
    report.add_argument("out", type=Path, metavar="OUT", help="output folder of a run (holds report.json)")

    compare = commands.add_parser("compare", help="compare runs in one table and one accuracy-latency chart")
    compare.add_argument("runs", type=Path, nargs="+", metavar="OUT",
                         help="output folders of two or more runs; a search folder stands for its chosen trial")
    compare.add_argument("--out", type=Path, help="write compare.md and compare.html into this folder "
                                                  "(default: print the Markdown)")

    profile = commands.add_parser("profile", help="time per operator of each stage of a run, on its own runtime")
    profile.add_argument("out", type=Path, metavar="OUT", help="output folder of a run")
    profile.add_argument("--stage", action="append", help="only this stage (repeatable; default: every stage)")
    profile.add_argument("--iterations", type=int, default=200, help="profiled inferences per stage")
    profile.add_argument("--threads", type=int, help="threads (default: the run's evaluate.latency.threads)")
    profile.add_argument("--top", type=int, default=8, help="operator types shown per stage")

    commands.add_parser("passes", help="list the registered passes")
    commands.add_parser("schema", help="print the recipe JSON Schema")
    return parser


def _check_recipe_text(path: Path) -> None:
    """A recipe is UTF-8 text; say so in one line when handed a binary file (a checkpoint given by mistake)."""
    try:
        with open(path, "rb") as handle:
            handle.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not a UTF-8 text file (byte {exc.start}); a recipe is YAML text — "
                          "was a model file given in its place?") from None
    except (IsADirectoryError, FileNotFoundError, NotADirectoryError):
        pass  # load_recipe reports these with its own message


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from optimizer.progress import Progress
    from optimizer.report.terminal import stage_table
    from optimizer.runner import run_recipe

    _check_recipe_text(args.recipe)
    progress = Progress(quiet=args.quiet)
    report = None
    error: OptimizerError | None = None
    try:
        report = run_recipe(args.recipe, checkpoint=args.checkpoint, out=args.out, overrides=args.overrides,
                            progress=progress, resume=args.resume, cache=args.cache)
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
    published = (report.data.get("publish") or {}).get("stage")
    held = f" (stage '{escape(published)}')" if published else ""
    console.print(f"report: {report.path / 'report.md'}" + (f"   artifact: {report.path / 'final'}{held}" if report.passed else ""))
    if error is not None:
        raise error
    return EXIT_OK


def _cmd_search(args: argparse.Namespace) -> int:
    from optimizer.search.driver import run_search

    _check_recipe_text(args.recipe)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    result = run_search(args.recipe, out=args.out, trials=args.trials, timeout_min=args.timeout,
                        workers=args.workers, ray=args.ray, resume=args.resume, overrides=args.overrides, log=log,
                        cache=args.cache)
    chosen = result.report["chosen"]
    print(f"chosen: trial {chosen['trial']} ({chosen['label']}): accuracy {chosen['accuracy']:.4f}, "
          f"p50 {chosen['p50_ms']:.4f} ms")
    print(f"report: {result.out / 'search.md'}   artifact: {result.out / 'final'}")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from optimizer.models import check_model_file
    from optimizer.recipe import load_recipe
    from optimizer.validate import validate_recipe

    _check_recipe_text(args.recipe)
    loaded = load_recipe(args.recipe, args.overrides, before_imports=_print_imports)
    checks = validate_recipe(loaded)
    if loaded.recipe.model.checkpoint is not None:
        # The same refusal of unsafe model files that a run applies first, from the file's bytes.
        check_model_file(loaded.resolve(loaded.recipe.model.checkpoint))
    for check in checks:
        print(f"ok  {check.what:<16} {check.detail}")
    print(f"{args.recipe}: valid")
    return EXIT_OK


def _print_imports(raw: dict, base_dir: Path) -> None:
    """List the code a schema-valid recipe names, before any of it is imported: loading the recipe imports its
    passes, and a run imports its factory, data sets and metrics, all with the user's rights."""
    from optimizer.validate import recipe_imports

    imports = recipe_imports(raw, base_dir)
    print(f"code this recipe imports ({len(imports)}; it runs with your rights, so trust the recipe as you "
          "would a script):", flush=True)
    width = max((len(item.module) for item in imports), default=0)
    for item in imports:
        print(f"    {item.module:<{width}}  {item.where}: {item.origin}", flush=True)


def _cmd_report(args: argparse.Namespace) -> int:
    from optimizer.report.render import rerender

    for path in rerender(args.out):
        print(f"wrote {path}")
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace) -> int:
    from optimizer.report.compare import compare, write_comparison

    if args.out is None:
        markdown, _ = compare(args.runs)
        print(markdown, end="")
        return EXIT_OK
    for path in write_comparison(args.runs, args.out):
        print(f"wrote {path}")
    return EXIT_OK


def _cmd_profile(args: argparse.Namespace) -> int:
    import json

    from optimizer.measure.profile import format_profile, profile_artifact

    report_path = args.out / "report.json"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{report_path}: cannot read the run's report ({exc}); give the output folder of a run") from None
    stages = [s for s in report["stages"] if s.get("artifact") and (not args.stage or s["name"] in args.stage)]
    unknown = sorted(set(args.stage or []) - {s["name"] for s in report["stages"]})
    if unknown:
        raise RecipeError(f"--stage {', '.join(unknown)}: not in {report_path}; stages: "
                          f"{', '.join(s['name'] for s in report['stages'])}")
    threads = args.threads or report["recipe"]["evaluate"]["latency"]["threads"]
    for stage in stages:
        profile = profile_artifact(args.out / stage["artifact"], threads=threads, iterations=args.iterations)
        print(format_profile(stage["name"], profile, args.top) if profile else f"{stage['name']}: not profiled")
    return EXIT_OK


def _cmd_passes(args: argparse.Namespace) -> int:
    from optimizer.registry import get_pass, pass_names

    rows = []
    for name in pass_names():
        try:
            cls = get_pass(name)
            outputs = "/".join(dict.fromkeys(cls.output_form_for(form) for form in cls.input_forms))
            rows.append((name, f"{'/'.join(cls.input_forms)} -> {outputs}", cls.summary))
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


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """The command line; SIGTERM (a scheduler, ``timeout``, ``docker stop``) stops it the way Ctrl-C does: trial
    and measurement processes are stopped too, earlier outputs stay intact, and the exit status is 130."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"run": _cmd_run, "search": _cmd_search, "validate": _cmd_validate, "passes": _cmd_passes, "schema": _cmd_schema,
               "report": _cmd_report, "compare": _cmd_compare, "profile": _cmd_profile}[args.command]
    try:
        return handler(args)
    except OptimizerError as exc:
        _traceback(args)
        if isinstance(exc, Interrupted):
            print(f"optimizer: {one_line(str(exc))}", file=sys.stderr)
        else:
            print(f"optimizer: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("optimizer: interrupted; outputs of earlier runs are unchanged", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("optimizer: error: out of memory; lower batch sizes or sample counts", file=sys.stderr)
        return EXIT_RESOURCE
    except OSError as exc:
        _traceback(args)
        if is_disk_full(exc):
            print(f"optimizer: error: disk full writing {exc.filename or 'the outputs'}; free some space and re-run",
                  file=sys.stderr)
            return EXIT_RESOURCE
        print(f"optimizer: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_STAGE_ERROR
    except Exception as exc:  # a bug, not a user error: still one line, the traceback on request
        _traceback(args)
        print(f"optimizer: error: internal error ({type(exc).__name__}: {one_line(str(exc))[:300]}); re-run with "
              "--debug for the traceback and report it", file=sys.stderr)
        return EXIT_STAGE_ERROR


def _traceback(args: argparse.Namespace) -> None:
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc()
