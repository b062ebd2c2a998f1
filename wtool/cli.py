"""The command line: parse options, call the library once, render the result.

Exit codes (one place, `_guard`): 0 ok; 1 a gate failed; 2 usage error; 3 invalid input (or an
input changed during the run); 4 output not writable; 5 the checkpoint is complete but what
follows it (a report) is not; 6 out of memory; 70 internal error; 128+N stopped by signal N
before anything was committed: 129 SIGHUP, 130 Ctrl-C, 131 SIGQUIT, 138/140 SIGUSR1/2,
142 SIGALRM, 143 SIGTERM; 141 stdout closed early (`| head`).
stdout carries only what was asked for; logs, progress and errors go to stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer vendors click
from typer.core import TyperGroup

from wtool import __version__, analyze, batch, pipeline, report
from wtool.errors import UsageError, WtoolError
from wtool.io import Inputs, atomic, is_folder_output, parse_size, protect
from wtool.new import new_checkpoint
from wtool.selection import Selector
from wtool.tensor import TensorInfo
from wtool.transforms import REGISTRY

OUT_OF_MEMORY = 6
MIN_COLUMNS = 20


class _Group(TyperGroup):
    """Click's own errors (a missing option value, `-j 0`, a missing recipe file) in wtool's
    one-line format, exit 2; and standard streams that are safe to write to."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        _prepare_streams()
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except ClickException as exc:
            context = getattr(exc, "ctx", None)
            command = context.command_path if context else "wtool"
            _stderr().print(f"[bold red]error:[/] {escape(exc.format_message())} (see {escape(command)} --help)",
                            soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="wtool",
    cls=_Group,
    help="Stream neural-network checkpoints through weight transforms and report what changed.\n\n"
         "Example: wtool apply model.safetensors out.safetensors -t quantize:bits=4",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


class Interrupted(BaseException):
    """A stopping signal, raised where the program is so that the writer removes its temp file."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: Signals that stop wtool cleanly (temporaries removed), with exit code 128 + N.
STOP_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1",
                                                   "SIGUSR2", "SIGALRM") if hasattr(signal, name)]
#: The checkpoint was committed and is complete, but something after it (a report) was not written.
EXIT_INCOMPLETE = 5


class _Outputs:
    """What a command writes, in order, so that a message after a failure says truly what is in place."""

    def __init__(self, checkpoint: str | Path | None = None) -> None:
        self.checkpoint = checkpoint
        self.todo: list[str] = []
        self.done: list[str] = []
        self.files: dict[str, Path] = {}  # report as given -> absolute (the working folder may be replaced)
        self.checkpoint_absolute = atomic.absolute(Path(checkpoint)) if checkpoint is not None else None
        self.mark = atomic.placements()
        self.inputs: Inputs | None = None  # what a report describes, checked unchanged before it is written

    def complete(self) -> list[str]:
        """What is in place: the checkpoint once committed, then the reports written."""
        placed = self.checkpoint_absolute is not None and atomic.placed(self.checkpoint_absolute, self.mark)
        return ([str(self.checkpoint)] if placed else []) + self.done

    def finished(self, what: str) -> None:
        self.todo.remove(what)
        self.done.append(what)

    def outcome(self) -> str | None:
        """`out is complete, but not r.json` once something is in place, else None."""
        complete = self.complete()
        if not complete:
            return None
        return f"{', '.join(complete)} {'is' if len(complete) == 1 else 'are'} complete, but not " \
               f"{', '.join(self.todo) or 'everything that follows'}"


_STDOUT_CLOSED = False


def _prepare_streams() -> None:
    """Closed standard streams (`>&-`, `2>&-`) become /dev/null, so no file wtool opens takes
    their number; text that the stream's encoding cannot hold (PYTHONIOENCODING=ascii) is
    replaced instead of failing."""
    global _STDOUT_CLOSED
    for number in (0, 1, 2):
        try:
            os.fstat(number)
        except OSError:
            descriptor = os.open(os.devnull, os.O_RDWR)
            if descriptor != number:
                os.dup2(descriptor, number)
                os.close(descriptor)
            if number == 1:
                _STDOUT_CLOSED = True
                sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
            elif number == 2:
                sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")


def _width(stream: Any) -> int:
    """COLUMNS when it is a usable number, else the terminal's width, or 180 when piped (CI logs, files)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) >= MIN_COLUMNS:
        return int(columns)
    if stream.isatty():
        with contextlib.suppress(OSError, ValueError):
            return max(os.get_terminal_size(stream.fileno()).columns, MIN_COLUMNS)
        return 80
    return 180


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich exits 1 here, the gate-failed code; let `_guard` map it to 141 instead."""
        self.quiet = True
        raise BrokenPipeError


def _console(stderr: bool) -> Console:
    """Honour NO_COLOR and COLUMNS (ignored when not a number of at least MIN_COLUMNS)."""
    stream = sys.stderr if stderr else sys.stdout
    plain = bool(os.environ.get("NO_COLOR"))  # no-color.org: wins over FORCE_COLOR
    return _Console(file=stream, no_color=plain or None, color_system=None if plain else "auto",
                   highlight=False, emoji=False, width=_width(stream))


def _stderr() -> Console:
    return _console(stderr=True)


def _stdout() -> Console:
    return _console(stderr=False)


def _signum(exc: BaseException) -> int:
    return exc.signum if isinstance(exc, Interrupted) else signal.SIGINT


def _stop_word(signum: int) -> str:
    return {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}.get(
        signum, f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def _guard(debug: bool, outputs: _Outputs | None = None) -> Iterator[None]:
    """The one place where errors become exit codes and one-line messages.

    Once an output is committed, every message says so (exit 5) instead of "no output written".
    """

    def on_signal(signum: int, frame: object) -> None:
        if not atomic.hold_signal(signum):  # held while an output is put in place
            raise Interrupted(signum)

    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    outputs = outputs or _Outputs()
    err = _stderr()
    try:
        yield
    except WtoolError as exc:
        if debug:
            traceback.print_exc()  # with the one-line message and the same exit code
        outcome = outputs.outcome()
        err.print(f"[bold red]error:[/] {escape(str(exc))}" + (f"; {escape(outcome)}" if outcome else ""),
                  soft_wrap=True)
        raise typer.Exit(EXIT_INCOMPLETE if outcome else exc.exit_code) from None
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = _signum(exc)
        outcome = outputs.outcome()
        err.print(f"[yellow]{_stop_word(signum)}[/]: {escape(outcome or 'no output written')}", soft_wrap=True)
        raise typer.Exit(EXIT_INCOMPLETE if outcome else 128 + signum) from None
    except (typer.Exit, SystemExit):
        raise
    except MemoryError:
        outcome = outputs.outcome()
        err.print(f"[bold red]error:[/] out of memory; {escape(outcome or 'no output written')} (try fewer "
                  "--jobs, or more memory)", soft_wrap=True)
        raise typer.Exit(EXIT_INCOMPLETE if outcome else OUT_OF_MEMORY) from None
    except BrokenPipeError:  # `wtool ... | head`: the reader left; stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except Exception as exc:  # a bug: one line, traceback only with --debug
        if debug:
            traceback.print_exc()
        err.print(f"[bold red]internal error:[/] {escape(type(exc).__name__)}: {escape(str(exc))} "
                  "(rerun with --debug for the traceback and please report it)", soft_wrap=True)
        raise typer.Exit(70) from None
    finally:
        atomic.remove_leftovers()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Bar:
    """A rich progress bar over tensors (or inputs: `unit`) and bytes, only when stderr is a terminal."""

    def __init__(self, label: str, enabled: bool, unit: str = "tensors") -> None:
        console = _stderr()
        self.enabled = enabled and console.is_terminal
        self.label = label
        self.unit = unit
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TextColumn("{task.fields[tensors]}"), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.task = None
        self.count = 0
        self.total = 0

    def __enter__(self) -> _Bar | None:
        if not self.enabled:
            return None
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def start(self, tensors: int, nbytes: int) -> None:
        self.total = tensors
        self.task = self.progress.add_task(self.label, total=max(nbytes, 1), tensors=f"0/{tensors}")

    def advance(self, info: TensorInfo) -> None:
        self.step(info.nbytes)

    def step(self, nbytes: int) -> None:
        self.count += 1
        self.progress.update(self.task, advance=nbytes, tensors=f"{self.count}/{self.total} {self.unit}")


def _version(value: bool) -> None:
    if value:
        print(f"wtool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", envvar="WTOOL_DEBUG",
                                        help="Show Python tracebacks instead of one-line errors.")] = False,
) -> None:
    """Stream neural-network checkpoints through weight transforms and report what changed.

    Example: wtool apply model.safetensors out.safetensors -t clip:percentile=99.9 -t quantize:bits=4
    """
    ctx.obj = {"debug": debug}


Include = Annotated[list[str], typer.Option("--include", "-i", help="Only tensors matching this glob "
                                            "(or re:REGEX, full match); repeatable, any may match.")]
Exclude = Annotated[list[str], typer.Option("--exclude", "-x", help="Never tensors matching this glob "
                                            "(or re:REGEX); repeatable; exclude wins over include.")]
AllowEmpty = Annotated[bool, typer.Option("--allow-empty", help="Allow patterns and steps that select no tensor.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no table.")]
Rows = Annotated[int, typer.Option("--rows", min=1, help="Table rows to show (the worst tensors when there are more).")]


def _debug(ctx: typer.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("debug"))


def _check_reports(outputs: _Outputs, reports: dict[str, str | None], force: bool,
                   inputs: list[Path] | None = None) -> dict[str, Path]:
    """Check report targets (option -> FILE or -) before any work; returns each file as given -> absolute.

    At most one goes to stdout; no two outputs share a path; none goes inside a folder output
    (which is replaced whole); an existing one needs `--force` and must be a regular file.
    `inputs` (commands without a pipeline) are protected here; `apply` leaves that to the
    library, which knows every file the run reads.
    """
    taken = [option for option, target in reports.items() if target == "-"]
    if len(taken) > 1:
        raise UsageError(f"{taken[0]} and {taken[1]} both write to stdout (-); only one may")
    checkpoint = outputs.checkpoint
    seen: dict[str, tuple[str, str]] = {}
    if checkpoint is not None:
        seen[os.path.realpath(checkpoint)] = ("the output", str(checkpoint))
    for option, target in reports.items():
        if target == "-" and _STDOUT_CLOSED:
            raise UsageError(f"stdout is closed: cannot write {option} -; give a file name")
        if not target:
            continue
        outputs.todo.append(target if target != "-" else "stdout")
        if target == "-":
            continue
        key = os.path.realpath(target)
        if key in seen:
            raise UsageError(f"{seen[key][0]} and {option} both write {seen[key][1]}")
        seen[key] = (option, target)
        if checkpoint is not None and is_folder_output(checkpoint) and \
                Path(os.path.realpath(checkpoint)) in Path(key).parents:
            raise UsageError(f"{option} {target} is inside the output folder {checkpoint}, which is "
                             f"replaced whole; write it beside")
        parent = Path(key).parent
        if not parent.is_dir():
            raise UsageError(f"cannot write {target}: folder {parent} does not exist")
        if Path(key).is_dir():
            raise UsageError(f"cannot write {target}: it is a folder")
        atomic.check_target(Path(target), force, "report")
        outputs.files[target] = atomic.absolute(Path(target))
    if inputs and outputs.todo:
        outputs.inputs = protect(inputs)
        for shown, target in outputs.files.items():
            outputs.inputs.refuse(target, "report", shown)
    return outputs.files


def _write_text(target: str, text: str | Iterable[str], outputs: _Outputs, force: bool) -> None:
    """Write a report (text, or pieces of it) as UTF-8 to stdout ('-') or, atomically, to a file;
    then count it as done. UTF-8 whatever the locale; a name that is not valid UTF-8 (a file
    name with a stray byte) is written with "?" in its place."""
    if outputs.inputs is not None:  # figures from a file that changed meanwhile would be a blend
        outputs.inputs.check_unchanged()
    if target == "-":
        sys.stdout.flush()
        for chunk in [text] if isinstance(text, str) else text:
            sys.stdout.buffer.write(chunk.encode("utf-8", "replace"))
        if isinstance(text, str) and not text.endswith("\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.buffer.flush()
        outputs.finished("stdout")
        return
    if isinstance(text, str) and not text.endswith("\n"):
        text += "\n"
    atomic.write_text(outputs.files[target], text, force=force)
    outputs.finished(target)


def _pipeline(transform: list[str], recipe: Path | None, include: list[str], exclude: list[str],
              **options: Any) -> pipeline.Pipeline:
    """The pipeline from `-t` steps or a recipe (not both), with the command line's patterns."""
    if transform and recipe:
        raise UsageError("give steps either with -t or in --recipe, not both "
                         "(put all steps in the recipe, or all on the command line)")
    if recipe:
        return pipeline.Pipeline.from_recipe(recipe, include=include, exclude=exclude, **options)
    return pipeline.Pipeline.from_specs(transform, selector=Selector(tuple(include), tuple(exclude)), **options)


Transforms = Annotated[list[str], typer.Option("--transform", "-t", help="A step NAME or NAME:key=value,...; "
                                               "repeatable, run in order.")]
Recipe = Annotated[Path | None, typer.Option("--recipe", "-r", exists=True, dir_okay=False,
                                             help="TOML recipe with [[steps]] (not together with -t).")]
NonFinite = Annotated[str, typer.Option("--nonfinite", help="NaN/Inf met by a step that would spread them: "
                                        "error, skip (leave that tensor alone) or zero (replace by 0).")]
ModelFiles = Annotated[bool, typer.Option("--model-files/--no-model-files", help="Folder to folder: copy every "
                                          "non-weight file and sub-folder (config, tokenizer, sentence-transformers "
                                          "modules, custom code) beside the weights.")]
ReportPath = Annotated[str | None, typer.Option("--json", "--report", help="Write the JSON report to FILE, or - for "
                                                "stdout (--report is the same).")]
Markdown = Annotated[str | None, typer.Option("--markdown", help="Write a Markdown summary to FILE (or -).")]


@app.command()
def apply(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="Input: .safetensors, .npz, or a sharded folder / its index.")],
    output: Annotated[str | None, typer.Argument(help="Output: .safetensors, .npz, or a folder (sharded). "
                                                     "Omit with --dry-run.")] = None,
    transform: Transforms = [],  # noqa: B006
    recipe: Recipe = None,
    include: Include = [],  # noqa: B006
    exclude: Exclude = [],  # noqa: B006
    allow_empty: AllowEmpty = False,
    nonfinite: NonFinite = "error",
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Print the plan; read no data, write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output, if it is a "
                                        "checkpoint wtool may replace (see the README); never an input.")] = False,
    model_files: ModelFiles = True,
    update_config: Annotated[bool, typer.Option("--update-config", help="Folder to folder with a cast step: "
                                                "record the new dtype in the copied config.json "
                                                "(bfloat16 for float8 weights, which transformers "
                                                "cannot build).")] = False,
    max_shard_size: Annotated[str | None, typer.Option("--max-shard-size", help="Write a sharded folder with "
                                                          "shards of at most this size, e.g. 5GB.")] = None,
    report_path: ReportPath = None,
    markdown: Markdown = None,
    html: Annotated[str | None, typer.Option("--html", help="Write a self-contained HTML report (sortable "
                                                "table, before/after histograms) to FILE.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Tensors computed at once, in threads; "
                                      "peak memory grows with it. From 2 on, the statistics process "
                                      "counts as one when one job keeps it busy.")] = 1,
    allow_requantize: Annotated[bool, typer.Option("--allow-requantize", help="Read compressed weights (packed, "
                                                   "fp8, codebook) as dense floats so steps may change them; "
                                                   "without it such steps are refused.")] = False,
    stats: Annotated[bool, typer.Option("--stats/--no-stats", help="Statistics, error metrics and histograms "
                                        "per tensor; --no-stats reports only the steps and what changed "
                                        "(and steps skip figures that cost passes of their own: sparsify's "
                                        "energy).")] = True,
    quiet: Quiet = False,
    rows: Rows = report.SHOW_ROWS,
) -> None:
    """Run a pipeline of transforms over a checkpoint and write a new one.

    With no steps, apply is a faithful copy or conversion (npz → safetensors, single file →
    sharded folder with --max-shard-size, re-sharding).

    Example: wtool apply model.safetensors out.safetensors -t clip:percentile=99.9
    -t quantize:bits=4,granularity=group,group_size=128 -t sparsify:fraction=0.5 --report report.json
    """
    outputs = _Outputs(output)
    with _guard(_debug(ctx), outputs):
        if output is None and not dry_run:
            raise UsageError("missing OUTPUT (or pass --dry-run to only print the plan)")
        reports = _check_reports(outputs, {"--report": report_path, "--markdown": markdown, "--html": html}, force)
        pipe = _pipeline(transform, recipe, include, exclude, allow_empty=allow_empty, nonfinite=nonfinite,
                         allow_requantize=allow_requantize)
        shard = parse_size(max_shard_size) if max_shard_size else None
        with _Bar("apply", not quiet and not dry_run) as bar:
            result = pipeline.run(pipe, source, output, force=force, max_shard_size=shard, dry_run=dry_run,
                                  copy_model_files=model_files, update_config=update_config, jobs=jobs,
                                  stats=stats, progress=bar, reports=list(reports.values()),
                                  reads=[recipe] if recipe else [])
        stdout_taken = "-" in (report_path, markdown)
        console = _stderr() if stdout_taken else _stdout()
        if report_path:
            _write_text(report_path, report.json_chunks(result), outputs, force)
        if markdown:
            _write_text(markdown, report.apply_markdown(result, rows), outputs, force)
        if html:
            _write_text(html, report.html_chunks(result), outputs, force)
        if dry_run:
            _print_plan(result, console, rows)
        elif not quiet:
            report.print_apply(result, console, rows)


@app.command()
def decompress(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="A compressed checkpoint: .safetensors or a model folder.")],
    output: Annotated[Path, typer.Argument(help="Output: .safetensors, .npz, or a folder (sharded).")],
    dtype: Annotated[str | None, typer.Option("--dtype", help="bfloat16, float16 or float32 for every decompressed "
                                              "weight (default: the dtype of its scale).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")] = False,
    max_shard_size: Annotated[str | None, typer.Option("--max-shard-size", help="Write a sharded folder with "
                                                          "shards of at most this size, e.g. 5GB.")] = None,
    report_path: Annotated[str | None, typer.Option("--report", help="Write the JSON report to FILE, or - for stdout.")] = None,
    quiet: Quiet = False,
    rows: Rows = report.SHOW_ROWS,
) -> None:
    """Turn packed int (pack-quantized), fp8 (float-quantized) and codebook weights, written by
    wtool or by compressed-tensors / llm-compressor, back into a plain dense checkpoint; a
    folder's config.json loses its quantization_config.

    Example: wtool decompress model-w4a16/ model-dense/ --dtype bfloat16
    """
    outputs = _Outputs(output)
    with _guard(_debug(ctx), outputs):
        if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
            raise UsageError(f"--dtype {dtype!r}: expected bfloat16, float16 or float32")
        reports = _check_reports(outputs, {"--report": report_path}, force)
        shard = parse_size(max_shard_size) if max_shard_size else None
        with _Bar("decompress", not quiet) as bar:
            result = pipeline.decompress(source, output, dtype, force=force, max_shard_size=shard, progress=bar,
                                         reports=reports)
        console = _stderr() if report_path == "-" else _stdout()
        if report_path:
            _write_text(report_path, report.json_chunks(result), outputs, force)
        if not quiet:
            report.print_apply(result, console, rows)


def _print_plan(result: report.Report, console: Console, rows: int) -> None:
    console.print(report.plan_table(result, rows))
    for line in report.plan_details(result):
        console.print(line)
    totals = result.totals
    console.print(f"[dim]dry run: nothing was written ({totals['changed']} of "
                  f"{len(result.tensors)} tensors would change; "
                  f"{report.arrow(report.human_bytes(totals['bytes_in']), report.human_bytes(totals['bytes_out']))} "
                  "in total)[/]")


@app.command(name="batch")
def batch_command(
    ctx: typer.Context,
    inputs: Annotated[list[str], typer.Argument(help="Checkpoint files, model folders, folders holding "
                                                "checkpoints, or quoted globs.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Outputs go here, named as their inputs.",
                                          show_default=False)],
    transform: Transforms = [],  # noqa: B006
    recipe: Recipe = None,
    include: Include = [],  # noqa: B006
    exclude: Exclude = [],  # noqa: B006
    allow_empty: AllowEmpty = False,
    nonfinite: NonFinite = "error",
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Inputs converted at once.")] = 1,
    executor: Annotated[str | None, typer.Option("--executor", "-e", help="serial, threads, processes or ray "
                                                 "(pip install 'wtool\\[ray]'; RAY_ADDRESS picks a cluster). "
                                                 "Default: serial, or processes with --jobs > 1.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip inputs whose output is complete and made by this "
                                         "pipeline; redo those made by another.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace every existing output.")] = False,
    model_files: ModelFiles = True,
    report_path: ReportPath = None,
    markdown: Markdown = None,
    quiet: Quiet = False,
) -> None:
    """Run one pipeline over many checkpoints; a failing input never stops the others.

    Exit 0 when every input succeeded (or was skipped by --resume), 1 when any failed.

    Example: wtool batch 'runs/*/' --out-dir quantized/ -t quantize:bits=4 --jobs 2 --resume --report batch.json
    """
    outputs = _Outputs()
    with _guard(_debug(ctx), outputs):
        replace = force or resume  # a report of the previous run is replaced too
        reports = _check_reports(outputs, {"--report": report_path, "--markdown": markdown}, replace)
        pipe = _pipeline(transform, recipe, include, exclude, allow_empty=allow_empty, nonfinite=nonfinite)
        job = batch.Batch.plan(inputs, out_dir, pipe, force=force, resume=resume, reports=list(reports.values()),
                               executor=executor or ("serial" if jobs == 1 else "processes"), workers=jobs,
                               copy_model_files=model_files)
        try:
            with _Bar("batch", not quiet, unit="inputs") as bar:
                if bar:
                    bar.start(len(job.entries), sum(e.nbytes for e in job.entries))
                result = job.run(on_done=(lambda entry, item: bar.step(entry.nbytes)) if bar else None)
        except (KeyboardInterrupt, Interrupted) as exc:
            result = job.report()
            _batch_results(result, report_path, markdown, outputs, replace, quiet)
            _stderr().print(f"[yellow]{_stop_word(_signum(exc))}[/]: {escape(report.batch_summary(result))}; the "
                            "outputs in flight left nothing (rerun with --resume for the rest)", soft_wrap=True)
            raise typer.Exit(128 + _signum(exc)) from None
        _batch_results(result, report_path, markdown, outputs, replace, quiet)
        if result.summary["failed"]:
            raise typer.Exit(1)


def _emit(outputs: _Outputs, force: bool, quiet: bool, reports: dict[str | None, Callable[[], str | Iterable[str]]],
          table: Callable[[], Any]) -> None:
    """Write each report asked for (target -> how to render it; a file, or - for stdout), then
    the table on whichever stream is left free."""
    console = _stderr() if "-" in reports else _stdout()
    for target, render in reports.items():
        if target:
            _write_text(target, render(), outputs, force)
    if not quiet:
        console.print(table())


def _batch_results(result: report.BatchReport, report_path: str | None, markdown: str | None, outputs: _Outputs,
                   force: bool, quiet: bool) -> None:
    _emit(outputs, force, quiet, {report_path: lambda: report.dumps(result.to_json()),
                                  markdown: lambda: report.batch_markdown(result)},
          lambda: report.batch_table(result))


@app.command()
def inspect(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A .safetensors, .npz, or sharded folder / index.")],
    json_out: Annotated[str | None, typer.Option("--json", help="Write the JSON report to FILE, or - for stdout.")] = None,
    include: Include = [],  # noqa: B006
    exclude: Exclude = [],  # noqa: B006
    allow_empty: AllowEmpty = False,
    hist: Annotated[list[str], typer.Option("--hist", help="Also draw a value histogram of this tensor; repeatable.")] = [],  # noqa: B006
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing report file.")] = False,
    quiet: Quiet = False,
) -> None:
    """Show per-tensor statistics, totals by dtype, metadata and format.

    Example: wtool inspect model.safetensors --include '*.weight' --json - | jq '.totals'
    or: wtool inspect model.safetensors --hist lm_head.weight
    """
    outputs = _Outputs()
    with _guard(_debug(ctx), outputs):
        _check_reports(outputs, {"--json": json_out}, force, [path])
        with _Bar("inspect", not quiet) as bar:
            result = analyze.inspect(path, Selector(tuple(include), tuple(exclude)), allow_empty=allow_empty,
                                     progress=bar)
        console = _stderr() if json_out == "-" else _stdout()
        if json_out:
            _write_text(json_out, report.json_chunks(result), outputs, force)
        if not quiet and json_out != "-":  # JSON on stdout: nothing else anywhere but errors
            console.print(report.inspect_table(result))
            if result.metadata:
                console.print("[bold]metadata[/]: " + escape(", ".join(f"{k}={v[:80]}" for k, v in result.metadata.items())))
        for name in hist:
            counts, low, high = analyze.value_histogram(path, name)
            console.print(escape("\n".join(report.hist_lines(name, counts, low, high))), soft_wrap=True)


@app.command()
def diff(
    ctx: typer.Context,
    a: Annotated[Path, typer.Argument(help="Reference checkpoint.")],
    b: Annotated[Path, typer.Argument(help="Checkpoint to compare with it.")],
    json_out: Annotated[str | None, typer.Option("--json", help="Write the JSON report to FILE, or - for stdout.")] = None,
    markdown: Annotated[str | None, typer.Option("--markdown", help="Write a Markdown summary to FILE (or -).")] = None,
    fail_above: Annotated[list[str], typer.Option("--fail-above", help="Gate METRIC=VALUE (max_abs, mse, rel_l2: "
                                                  "exit 1 when any tensor exceeds it; weighted_rel_l2: when the "
                                                  "parameter-weighted total does); repeatable.")] = [],  # noqa: B006
    fail_below: Annotated[list[str], typer.Option("--fail-below", help="Gate METRIC=VALUE (cosine, sqnr_db: "
                                                  "exit 1 when any tensor falls below it; weighted_sqnr_db: when the "
                                                  "parameter-weighted total does); repeatable.")] = [],  # noqa: B006
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Tensors present on one side only do not fail.")] = False,
    include: Include = [],  # noqa: B006
    exclude: Exclude = [],  # noqa: B006
    allow_empty: AllowEmpty = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace existing report files.")] = False,
    quiet: Quiet = False,
    rows: Rows = report.SHOW_ROWS,
) -> None:
    """Compare two checkpoints tensor by tensor; gate a CI job on the result.

    Exit 1 when a gate is exceeded, when tensors are missing on one side (unless
    --allow-missing) or when shapes differ.

    Example: wtool diff model.safetensors quantized.safetensors --fail-above rel_l2=0.05 --fail-below sqnr_db=20
    """
    outputs = _Outputs()
    with _guard(_debug(ctx), outputs):
        _check_reports(outputs, {"--json": json_out, "--markdown": markdown}, force, [a, b])
        above = analyze.parse_gates(fail_above, analyze.ABOVE_METRICS, "--fail-above")
        below = analyze.parse_gates(fail_below, analyze.BELOW_METRICS, "--fail-below")
        with _Bar("diff", not quiet) as bar:
            result = analyze.diff(a, b, Selector(tuple(include), tuple(exclude)), fail_above=above, fail_below=below,
                                  allow_missing=allow_missing, allow_empty=allow_empty, progress=bar)
        _emit(outputs, force, quiet, {json_out: lambda: report.json_chunks(result),
                                      markdown: lambda: report.diff_markdown(result, rows)},
              lambda: report.diff_table(result, rows))
        if not result.passed:
            failed = [line for line in result.summary() if line.startswith("FAILED")]
            _stderr().print(f"[bold red]diff failed[/]: {escape('; '.join(failed))}", soft_wrap=True)
            raise typer.Exit(1)


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    base: Annotated[Path, typer.Argument(help="Reference model folder: config.json, tokenizer, weights.")],
    candidate: Annotated[Path, typer.Argument(help="Model folder to compare with it, or a checkpoint file "
                                              "holding weights for BASE's architecture.")],
    task: Annotated[str | None, typer.Option("--task", help="encoder, causal-lm or hidden "
                                             "(default: from BASE's config.json).")] = None,
    text: Annotated[Path | None, typer.Option("--text", exists=True, dir_okay=False,
                                              help="Inputs, one per line (default: a built-in sample of "
                                                   "40 varied sentences).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=2, help="Tokens per input at most.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Inputs per forward pass.")] = 8,
    device: Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="torch's random seed.")] = 0,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the JSON report to FILE, or - for stdout.")] = None,
    markdown: Annotated[str | None, typer.Option("--markdown", help="Write a Markdown summary to FILE (or -).")] = None,
    fail_above: Annotated[list[str], typer.Option("--fail-above", help="Gate METRIC=VALUE, e.g. kl_mean=0.05: "
                                                  "exit 1 when the metric exceeds it; repeatable.")] = [],  # noqa: B006
    fail_below: Annotated[list[str], typer.Option("--fail-below", help="Gate METRIC=VALUE, e.g. cosine_min=0.99: "
                                                  "exit 1 when the metric falls below it; repeatable.")] = [],  # noqa: B006
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace existing report files.")] = False,
    quiet: Quiet = False,
) -> None:
    """Run two models on the same inputs and compare what they do (needs 'wtool[eval]').

    Encoders: cosine_min, cosine_mean of mean-pooled final hidden states. Causal LMs: kl_mean,
    top1, ppl_base, ppl_candidate, ppl_ratio. All: hidden_rel_l2. Exit 1 when a gate fails.

    Example: wtool eval model/ quantized/ --fail-below cosine_min=0.99 --markdown - >> "$GITHUB_STEP_SUMMARY"
    """
    outputs = _Outputs()
    with _guard(_debug(ctx), outputs):
        from wtool.evaluate import ALL_METRICS, evaluate_models, read_texts

        _check_reports(outputs, {"--json": json_out, "--markdown": markdown}, force, [base, candidate])
        above = analyze.parse_gates(fail_above, ALL_METRICS, "--fail-above")
        below = analyze.parse_gates(fail_below, ALL_METRICS, "--fail-below")
        texts = read_texts(text) if text else None
        result = evaluate_models(base, candidate, task=task, texts=texts, max_tokens=max_tokens, batch_size=batch_size,
                          device=device, seed=seed, fail_above=above, fail_below=below)
        _emit(outputs, force, quiet, {json_out: lambda: report.dumps(result.to_json()),
                                      markdown: lambda: report.eval_markdown(result)},
              lambda: report.eval_table(result))
        if not result.passed:
            first = result.failures[0]
            _stderr().print(f"[bold red]eval failed[/]: {len(result.failures)} gate(s); first: "
                            f"{first['metric']} = {first['value']:.6g} against {first['limit']:g}", soft_wrap=True)
            raise typer.Exit(1)


@app.command()
def new(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Argument(help="TOML (or .json) spec: [defaults], [metadata], [[tensors]] "
                                         "with name, shape, dtype and init options.")],
    output: Annotated[str, typer.Argument(help="Output: .safetensors, .npz, or a folder (sharded).")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")] = False,
    max_shard_size: Annotated[str | None, typer.Option("--max-shard-size", help="Write a sharded folder with "
                                                       "shards of at most this size, e.g. 5GB.")] = None,
    quiet: Quiet = False,
) -> None:
    """Create a checkpoint from scratch (names, shapes, dtypes; Xavier/He/constant init), one
    tensor in memory at a time: for tests, fixtures and benchmarks.

    Example: wtool new spec.toml model.safetensors   (spec: [[tensors]] name = "fc.weight" shape = [256, 128])
    """
    with _guard(_debug(ctx), _Outputs(output)):
        shard = parse_size(max_shard_size) if max_shard_size else None
        infos = new_checkpoint(spec, output, force=force, max_shard_size=shard)
        if not quiet:
            total = sum(i.nbytes for i in infos)
            _stderr().print(f"wrote {escape(str(output))}: {len(infos)} tensors, {report.human_bytes(total)}")


@app.command()
def transforms(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Show one transform in detail.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table of every transform as Markdown "
                                           "(the README's table is this output).")] = False,
) -> None:
    """List every transform, or show one: parameters, defaults, applicability, formula.

    Example: wtool transforms quantize
    """
    with _guard(_debug(ctx)):
        console = _stdout()
        if markdown:
            sys.stdout.write(report.transforms_markdown(REGISTRY))
            return
        if name is None:
            table = Table(title="transforms (wtool transforms NAME for details)", title_justify="left")
            table.add_column("name", style="bold")
            table.add_column("summary")
            table.add_column("example", style="cyan")
            for key in sorted(REGISTRY):
                cls = REGISTRY[key]
                table.add_row(key, escape(cls.summary()), escape(f"-t {cls.example}"))
            console.print(table)
            return
        if name not in REGISTRY:
            from wtool.transforms import Transform

            Transform.create(name)  # raises the "did you mean" UsageError
        cls = REGISTRY[name]
        console.print(f"[bold]{name}[/]: {escape(cls.summary())}")
        console.print(f"formula: {escape(cls.formula)}")
        console.print(f"applies to: {escape(cls.applies_to)}")
        console.print(f"example: wtool apply in.safetensors out.safetensors -t {escape(cls.example)}")
        table = Table(title="parameters", title_justify="left")
        for column in ("name", "type", "default", "range / choices", "help"):
            table.add_column(column, overflow="fold")
        for p in cls.describe_params():
            allowed = ", ".join(p["choices"]) if p["choices"] else _range(p["low"], p["high"])
            default = "(required)" if p["required"] else ("none" if p["default"] is None else str(p["default"]))
            table.add_row(*map(escape, (p["name"], p["type"], default, allowed, p["help"])))
        console.print(table)


def _range(low: float | None, high: float | None) -> str:
    if low is None and high is None:
        return ""
    return f"[{'-∞' if low is None else low}, {'∞' if high is None else high}]"


def main() -> None:
    """Console-script entry point.

    After a stopping signal the process ends with `os._exit` once its output is flushed:
    threads still computing abandoned tensors (`--jobs`) would otherwise hold the exit back.
    """
    try:
        app()
    except SystemExit as exc:
        if isinstance(exc.code, int) and exc.code > 128 and threading.active_count() > 1:
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(exc.code)
        raise
