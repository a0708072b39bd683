"""The ``zoo`` click group and the one place where errors become messages."""

from __future__ import annotations

import os
import sys
import traceback

import click

from zoo.errors import ZooError

DEBUG_VARIABLE = "ZOO_DEBUG"
NEW_VERSION_HELP = ("Add it as the next version of an adapter name already registered "
                    "(it serves nobody until 'zoo promote'); the same content is a no-op.")


def version_label(entry) -> str:
    """``NAME``, or ``NAME:vN`` for a version after the first."""
    version = getattr(entry, "version", 1)
    return entry.name if version == 1 else f"{entry.name}:v{version}"


def explain(exc: ZooError) -> str:
    """An error as one line: what went wrong, then what to do."""
    hint = f" {exc.hint}" if exc.hint else ""
    return f"{exc.message.rstrip('.')}.{hint}"


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class ZooGroup(click.Group):
    """Maps every error to one line on stderr, in one place (tracebacks on ZOO_DEBUG=1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except ZooError as exc:
            self._debug()
            fail(explain(exc))
        except KeyboardInterrupt:
            fail("interrupted; nothing was left half-written", 130)
        except BrokenPipeError:  # `zoo list | head`: the reader left; quiet, as Unix tools are
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush at exit
            sys.exit(128 + 13)  # SIGPIPE's
        except Exception as exc:  # noqa: BLE001 - the edge of the program
            self._debug()
            fail(f"unexpected {type(exc).__name__}: {exc}. "
                 f"Set {DEBUG_VARIABLE}=1 for a traceback and report it.", 2)

    @staticmethod
    def _debug() -> None:
        if os.environ.get(DEBUG_VARIABLE):
            traceback.print_exc()


@click.group(cls=ZooGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zoo")
def cli() -> None:
    """zoo: catalog, merge, sync and serve many adapters on one base model."""

