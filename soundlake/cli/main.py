"""The root of the `soundlake` command line: the app, its command groups, shared options and `main()`.

The commands live in one module per group (curate, catalog, export, captions, generate,
inference, dedup, serve); each registers itself on :data:`app` or on a group typer defined here. The
package (``soundlake/cli/__init__.py``) imports them, so importing ``soundlake.cli`` or
``soundlake.cli.main`` gives the full command tree.

Errors: a command raises :class:`~soundlake.core.errors.UserError` for anything the user
can fix; the root command (:class:`SoundlakeGroup`) turns it into one ``error: <message>``
line on stderr and exit code 2, and so it does with an ``OSError`` the user can fix (a
read-only or full disk, permissions: :func:`soundlake.core.storage.storage_error` decides by
errno). Anything else is a bug and keeps its traceback. That one handler serves the console
script (:func:`main`), ``python -m soundlake.cli`` and in-process ``CliRunner().invoke(app, ...)``.

Commands that start Ray take ``--verbose`` (:data:`VERBOSE`); without it Ray's own warnings
and log lines go to a log in Ray's session folder instead of the terminal.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from soundlake.core.errors import UserError

console = Console(stderr=True)  # progress, summaries, errors
stdout = Console()              # results: tables a user may pipe

LAKE = typer.Option("./lake", "--lake", "-l", help="Lake root: a folder or an object-store URI (s3://...).")


def set_catalog(uri: str | None) -> str | None:
    """--catalog reaches every Lake the command opens through the environment, as
    SOUNDLAKE_CATALOG does (a bad URI fails here, naming the option)."""
    if uri:
        from soundlake.catalog.locks import ENV, normalize

        normalize(uri)
        os.environ[ENV] = uri
    return uri


CATALOG = typer.Option(None, "--catalog", callback=set_catalog, metavar="URI",
                       help="Where the lake's writer lock is kept: sqlite:////path/catalog.db (one machine) or "
                            "postgresql://user@host/db (several). An object-store lake needs one; the lake records "
                            "it (without the password), so it is needed once. Default: $SOUNDLAKE_CATALOG, then the "
                            "lake's record, else a local lake's own lock file.")


def set_verbose(verbose: bool) -> bool:
    from soundlake.core.ray_env import set_verbose as set_ray_verbose

    set_ray_verbose(verbose)
    return verbose


VERBOSE = typer.Option(False, "--verbose", "-v", callback=set_verbose,
                       help="Show Ray's own warnings, log lines and worker output here; without it they go to "
                            "soundlake-<pid>.log in Ray's session log folder (the summary says where).")

# Panels of the root --help: what a user does with each group of commands.
CURATE = "Curate: build the lake"
LAKE_PANEL = "Lake: query, report and export"
MODELS = "Models: train, generate, convert"
EVALUATE = "Evaluate: quality and speed"


def report_error(e: UserError) -> None:
    """Print ``error: <message>`` in bold red to stderr, on one line (not wrapped, not read as markup)."""
    console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)


@contextmanager
def as_user_error(*kinds: type[Exception]):
    """Inside: these exceptions (e.g. a library's ValueError on bad input) end the command
    like a UserError, with one error line."""
    try:
        yield
    except kinds as e:
        raise UserError(str(e)) from None


class SoundlakeGroup(TyperGroup):
    """The root command: a UserError raised by any command, or an OSError the user can fix,
    becomes one error line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as e:
            from soundlake.core.storage import storage_error

            err = e if isinstance(e, UserError) else storage_error(e)
            if err is None:
                raise
            report_error(err)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=SoundlakeGroup,
    help="Curate audio–caption datasets into a DuckDB/Parquet lake with Ray, query them with SQL, "
         "export training shards and retrain text-to-audio generators.\n\n"
         "Command groups: curate (curate, retry-failed, recaption, dedup) · lake (sql, status, report, export, "
         "eval-sets, serve) · "
         "models (train, encode, generate, convert) · evaluate (evaluate, calibrate-cache). "
         "`soundlake COMMAND --help` says what each one does and writes.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

report_app = typer.Typer(help="Reports on the lake's contents (HTML + Markdown files).", no_args_is_help=True)
train_app = typer.Typer(help="Train the project's own models (CLAP, captioner, VAE, DiT) into model folders.",
                        no_args_is_help=True)
convert_app = typer.Typer(help="Convert released checkpoints into folders soundlake loads.", no_args_is_help=True)
# `evaluate` runs the generation evaluation itself (soundlake.cli.inference) and has subcommands (captions).
evaluate_app = typer.Typer()
eval_sets_app = typer.Typer(help="Evaluation sets whose clips must stay out of training exports (leakage).",
                            no_args_is_help=True)

app.add_typer(report_app, name="report", rich_help_panel=LAKE_PANEL)
app.add_typer(train_app, name="train", rich_help_panel=MODELS)
app.add_typer(convert_app, name="convert", rich_help_panel=MODELS)
app.add_typer(evaluate_app, name="evaluate", rich_help_panel=EVALUATE)
app.add_typer(eval_sets_app, name="eval-sets", rich_help_panel=LAKE_PANEL)


def main() -> None:
    """The `soundlake` console script and ``python -m soundlake.cli``."""
    app()
