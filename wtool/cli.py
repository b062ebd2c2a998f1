"""The command line: parse options, call the library once, render the result.

Exit codes (one place, `_guard`): 0 ok; 1 a gate failed; 2 usage error; 3 invalid input;
4 output not writable; 5 out of memory; 70 internal error; 130 interrupted (Ctrl-C); 141 stdout closed early
(`| head`); 143 terminated (SIGTERM).
stdout carries only what was asked for; logs, progress and errors go to stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Iterator
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

from wtool import __version__, analyze, pipeline, report
from wtool.errors import UsageError, WtoolError
from wtool.io import parse_size
from wtool.new import new_checkpoint
from wtool.selection import Selector
from wtool.tensor import TensorInfo
from wtool.transforms import REGISTRY, GroupTransform

OUT_OF_MEMORY = 5
MIN_COLUMNS = 20


class _Group(TyperGroup):
    """Click's own errors (a missing option value, `-j 0`, a missing recipe file) in wtool's
    one-line format, exit 2; and standard streams that are safe to write to."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
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
    """SIGTERM, raised where the program is so that the writer removes its temp file."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


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
                sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
            elif number == 2:
                sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
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


@contextlib.contextmanager
def _guard(debug: bool) -> Iterator[None]:
    """The one place where errors become exit codes and one-line messages."""

    def on_term(signum: int, frame: object) -> None:
        raise Interrupted(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    err = _stderr()
    try:
        yield
    except WtoolError as exc:
        if debug:
            traceback.print_exc()  # with the one-line message and the same exit code
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: no output written")
        raise typer.Exit(130) from None
    except Interrupted as exc:
        err.print("[yellow]terminated[/]: no output written")
        raise typer.Exit(exc.code) from None
    except (typer.Exit, SystemExit):
        raise
    except MemoryError:
        err.print(f"[bold red]error:[/] out of memory (nothing written; try fewer --jobs or a machine with more "
                  f"memory)", soft_wrap=True)
        raise typer.Exit(OUT_OF_MEMORY) from None
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
        signal.signal(signal.SIGTERM, previous)


class _Bar:
    """A rich progress bar over tensors and bytes, only when stderr is a terminal."""

    def __init__(self, label: str, enabled: bool) -> None:
        console = _stderr()
        self.enabled = enabled and console.is_terminal
        self.label = label
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
        self.count += 1
        self.progress.update(self.task, advance=info.nbytes, tensors=f"{self.count}/{self.total} tensors")


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


def _refuse_overwriting(reports: list[str | None], checkpoints: list[Path | None]) -> None:
    """Check report targets before any work: a report written onto a checkpoint (or a shard or
    index in its folder) would destroy it, and one that cannot be written would fail only
    after the output checkpoint was committed."""
    for target in reports:
        if target == "-" and _STDOUT_CLOSED:
            raise UsageError("stdout is closed: cannot write a report to -; give a file name")
        if not target or target == "-":
            continue
        resolved = Path(target).resolve()
        if not resolved.parent.is_dir():
            raise UsageError(f"cannot write {target}: folder {resolved.parent} does not exist")
        if resolved.is_dir():
            raise UsageError(f"cannot write {target}: it is a folder")
        for checkpoint in filter(None, checkpoints):
            path = checkpoint.resolve()
            folder = path.parent if path.name.endswith(".index.json") else path
            inside = folder.is_dir() and resolved.parent == folder and resolved.exists() and \
                resolved.name.endswith((".safetensors", ".index.json"))
            if resolved == path or inside:
                raise UsageError(f"{target} is the checkpoint {checkpoint}; write the report to another path")


def _write_text(target: str, text: str, out: Console) -> None:
    """Write UTF-8 to a file, or to stdout for '-', whatever the locale (a name that is not
    valid UTF-8, such as a file name with a stray byte, is written with "?" in its place)."""
    text = text if text.endswith("\n") else text + "\n"
    if target == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8", "replace"))
        sys.stdout.buffer.flush()
        return
    try:
        Path(target).write_text(text, encoding="utf-8", errors="replace")
    except OSError as exc:
        from wtool.errors import OutputError

        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None


@app.command()
def apply(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="Input: .safetensors, .npz, or a sharded folder / its index.")],
    output: Annotated[Path | None, typer.Argument(help="Output: .safetensors, .npz, or a folder (sharded). "
                                                     "Omit with --dry-run.")] = None,
    transform: Annotated[list[str], typer.Option("--transform", "-t", help="A step NAME or NAME:key=value,...; "
                                                 "repeatable, run in order.")] = [],  # noqa: B006
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", exists=True, dir_okay=False,
                                                   help="TOML recipe with [[steps]] (not together with -t).")] = None,
    include: Include = [],  # noqa: B006
    exclude: Exclude = [],  # noqa: B006
    allow_empty: AllowEmpty = False,
    nonfinite: Annotated[str, typer.Option("--nonfinite", help="NaN/Inf met by a step that would spread them: "
                                           "error, skip (leave that tensor alone) or zero (replace by 0).")] = "error",
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Print the plan; read no data, write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")] = False,
    model_files: Annotated[bool, typer.Option("--model-files/--no-model-files", help="Folder to folder: copy "
                                              "every non-weight file and sub-folder (config, tokenizer, "
                                              "sentence-transformers modules, custom code) beside the weights.")] = True,
    update_config: Annotated[bool, typer.Option("--update-config", help="Folder to folder with a cast step: "
                                                "set torch_dtype in the copied config.json.")] = False,
    max_shard_size: Annotated[str | None, typer.Option("--max-shard-size", help="Write a sharded folder with "
                                                          "shards of at most this size, e.g. 5GB.")] = None,
    report_path: Annotated[str | None, typer.Option("--json", "--report", help="Write the JSON report to FILE, "
                                                    "or - for stdout (--report is the same).")] = None,
    markdown: Annotated[str | None, typer.Option("--markdown", help="Write a Markdown summary to FILE (or -).")] = None,
    html: Annotated[str | None, typer.Option("--html", help="Write a self-contained HTML report (sortable "
                                                "table, before/after histograms) to FILE.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Tensors computed at once, in threads; "
                                      "peak memory grows with it.")] = 1,
    quiet: Quiet = False,
    rows: Rows = report.SHOW_ROWS,
) -> None:
    """Run a pipeline of transforms over a checkpoint and write a new one.

    With no steps, apply is a faithful copy or conversion (npz → safetensors, single file →
    sharded folder with --max-shard-size, re-sharding).

    Example: wtool apply model.safetensors out.safetensors -t clip:percentile=99.9
    -t quantize:bits=4,granularity=group,group_size=128 -t sparsify:fraction=0.5 --report report.json
    """
    with _guard(_debug(ctx)):
        if transform and recipe:
            raise UsageError("give steps either with -t or in --recipe, not both "
                             "(put all steps in the recipe, or all on the command line)")
        if output is None and not dry_run:
            raise UsageError("missing OUTPUT (or pass --dry-run to only print the plan)")
        _refuse_overwriting([report_path, markdown, html], [source, output])
        options = {"allow_empty": allow_empty, "nonfinite": nonfinite}
        if recipe:
            pipe = pipeline.Pipeline.from_recipe(recipe, include=include, exclude=exclude, **options)
        else:
            pipe = pipeline.Pipeline.from_specs(transform, selector=Selector(tuple(include), tuple(exclude)), **options)
        shard = parse_size(max_shard_size) if max_shard_size else None
        with _Bar("apply", not quiet and not dry_run) as bar:
            result = pipeline.run(pipe, source, output, force=force, max_shard_size=shard, dry_run=dry_run,
                                  copy_model_files=model_files, update_config=update_config, jobs=jobs,
                                  progress=bar)
        stdout_taken = "-" in (report_path, markdown)
        console = _stderr() if stdout_taken else _stdout()
        if report_path:
            _write_text(report_path, report.dumps(result.to_json()), console)
        if markdown:
            _write_text(markdown, report.apply_markdown(result, rows), console)
        if html:
            _write_text(html, report.apply_html(result), console)
        if dry_run:
            _print_plan(result, console)
        elif not quiet:
            report.print_apply(result, console, rows)


def _print_plan(result: report.Report, console: Console) -> None:
    table = Table(title=f"plan for {escape(result.input)}", title_justify="left")
    table.add_column("tensor", overflow="fold")
    table.add_column("shape", justify="right")
    table.add_column("dtype")
    table.add_column("bytes", justify="right")
    table.add_column("steps", overflow="fold")
    for r in result.tensors:
        before = TensorInfo(r.name, r.dtype_before, tuple(r.shape)).nbytes if r.dtype_before else None
        after = TensorInfo(r.name, r.dtype, tuple(r.shape)).nbytes
        table.add_row(escape(r.name), "×".join(map(str, r.shape)) or "scalar", report.arrow(r.dtype_before, r.dtype),
                      report.arrow(before and report.human_bytes(before), report.human_bytes(after)),
                      escape(" → ".join(r.steps)) or "[dim]unchanged[/]")
    console.print(table)
    for line in report.plan_details(result):
        console.print(line)
    totals = result.totals
    console.print(f"[dim]dry run: nothing was written ({sum(bool(r.steps) for r in result.tensors)} of "
                  f"{len(result.tensors)} tensors would change; "
                  f"{report.arrow(report.human_bytes(totals['bytes_in']), report.human_bytes(totals['bytes_out']))} "
                  "in total)[/]")


@app.command()
def inspect(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A .safetensors, .npz, or sharded folder / index.")],
    json_out: Annotated[str | None, typer.Option("--json", help="Write the JSON report to FILE, or - for stdout.")] = None,
    include: Include = [],  # noqa: B006
    exclude: Exclude = [],  # noqa: B006
    allow_empty: AllowEmpty = False,
    hist: Annotated[list[str], typer.Option("--hist", help="Also draw a value histogram of this tensor; repeatable.")] = [],  # noqa: B006
    quiet: Quiet = False,
) -> None:
    """Show per-tensor statistics, totals by dtype, metadata and format.

    Example: wtool inspect model.safetensors --include '*.weight' --json - | jq '.totals'
    or: wtool inspect model.safetensors --hist lm_head.weight
    """
    with _guard(_debug(ctx)):
        _refuse_overwriting([json_out], [path])
        with _Bar("inspect", not quiet) as bar:
            result = analyze.inspect(path, Selector(tuple(include), tuple(exclude)), allow_empty=allow_empty,
                                     progress=bar)
        console = _stderr() if json_out == "-" else _stdout()
        if json_out:
            _write_text(json_out, report.dumps(result.to_json()), console)
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
    fail_above: Annotated[list[str], typer.Option("--fail-above", help="Gate METRIC=VALUE (max_abs, mse, rel_l2): "
                                                  "exit 1 when any tensor exceeds it; repeatable.")] = [],  # noqa: B006
    fail_below: Annotated[list[str], typer.Option("--fail-below", help="Gate METRIC=VALUE (cosine, sqnr_db): "
                                                  "exit 1 when any tensor falls below it; repeatable.")] = [],  # noqa: B006
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Tensors present on one side only do not fail.")] = False,
    include: Include = [],  # noqa: B006
    exclude: Exclude = [],  # noqa: B006
    allow_empty: AllowEmpty = False,
    quiet: Quiet = False,
    rows: Rows = report.SHOW_ROWS,
) -> None:
    """Compare two checkpoints tensor by tensor; gate a CI job on the result.

    Exit 1 when a gate is exceeded, when tensors are missing on one side (unless
    --allow-missing) or when shapes differ.

    Example: wtool diff model.safetensors quantized.safetensors --fail-above rel_l2=0.05 --fail-below sqnr_db=20
    """
    with _guard(_debug(ctx)):
        _refuse_overwriting([json_out, markdown], [a, b])
        above = analyze.parse_gates(fail_above, analyze.ABOVE_METRICS, "--fail-above")
        below = analyze.parse_gates(fail_below, analyze.BELOW_METRICS, "--fail-below")
        with _Bar("diff", not quiet) as bar:
            result = analyze.diff(a, b, Selector(tuple(include), tuple(exclude)), fail_above=above, fail_below=below,
                                  allow_missing=allow_missing, allow_empty=allow_empty, progress=bar)
        console = _stderr() if "-" in (json_out, markdown) else _stdout()
        if json_out:
            _write_text(json_out, report.dumps(result.to_json()), console)
        if markdown:
            _write_text(markdown, report.diff_markdown(result, rows), console)
        if not quiet:
            console.print(report.diff_table(result, rows))
        if not result.passed:
            failed = [line for line in result.summary() if line.startswith("FAILED")]
            _stderr().print(f"[bold red]diff failed[/]: {escape('; '.join(failed))}", soft_wrap=True)
            raise typer.Exit(1)


@app.command()
def new(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Argument(help="TOML (or .json) spec: [defaults], [metadata], [[tensors]] "
                                         "with name, shape, dtype and init options.")],
    output: Annotated[Path, typer.Argument(help="Output: .safetensors, .npz, or a folder (sharded).")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")] = False,
    max_shard_size: Annotated[str | None, typer.Option("--max-shard-size", help="Write a sharded folder with "
                                                       "shards of at most this size, e.g. 5GB.")] = None,
    quiet: Quiet = False,
) -> None:
    """Create a checkpoint from scratch (names, shapes, dtypes; Xavier/He/constant init), one
    tensor in memory at a time: for tests, fixtures and benchmarks.

    Example: wtool new spec.toml model.safetensors   (spec: [[tensors]] name = "fc.weight" shape = [256, 128])
    """
    with _guard(_debug(ctx)):
        shard = parse_size(max_shard_size) if max_shard_size else None
        infos = new_checkpoint(spec, output, force=force, max_shard_size=shard)
        if not quiet:
            total = sum(i.nbytes for i in infos)
            _stderr().print(f"wrote {escape(str(output))}: {len(infos)} tensors, {report.human_bytes(total)}")


@app.command()
def transforms(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Show one transform in detail.")] = None,
) -> None:
    """List every transform, or show one: parameters, defaults, applicability, formula.

    Example: wtool transforms quantize
    """
    with _guard(_debug(ctx)):
        console = _stdout()
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
        applies = cls.applies_to if not issubclass(cls, GroupTransform) else "groups of related tensors found by name"
        console.print(f"applies to: {escape(applies)}")
        console.print(f"example: wtool apply in.safetensors out.safetensors -t {escape(cls.example)}")
        table = Table(title="parameters", title_justify="left")
        for column in ("name", "type", "default", "range / choices", "help"):
            table.add_column(column, overflow="fold")
        for p in cls.describe_params():
            allowed = ", ".join(p["choices"]) if p["choices"] else _range(p["low"], p["high"])
            default = "(required)" if p["required"] else ("none" if p["default"] is None else str(p["default"]))
            table.add_row(p["name"], p["type"], default, allowed, escape(p["help"]))
        console.print(table)


def _range(low: float | None, high: float | None) -> str:
    if low is None and high is None:
        return ""
    return f"[{'-∞' if low is None else low}, {'∞' if high is None else high}]"


def main() -> None:
    """Console-script entry point."""
    app()
