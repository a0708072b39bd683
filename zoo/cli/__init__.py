"""The ``zoo`` command: parse, call one library function, render. Nothing else.

Heavy libraries (torch, transformers, vLLM) are imported inside the library
functions that need them, so ``zoo --help`` and ``zoo list`` start fast. The
group lives in ``app``; each module beside it adds its commands to it.
"""

from zoo.cli import catalog, hub, model, serve, versions  # noqa: F401  (each registers its commands)
from zoo.cli.app import cli


def main() -> None:
    cli(prog_name="zoo")
