"""Running the real ``zoo`` entry point from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from zoo.cli import cli


def zoo(*args: str, ok: bool = True) -> Result:
    """Run ``zoo ARGS`` in-process; with ok=True assert it succeeded."""
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="zoo")
    if ok:
        assert result.exit_code == 0, f"zoo {' '.join(map(str, args))}:\n{result.output}"
    return result


def zoo_json(*args: str):
    return json.loads(zoo(*args, "--json").stdout)


def zoo_process(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the installed ``zoo`` console script in a subprocess."""
    exe = Path(sys.executable).with_name("zoo")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)
