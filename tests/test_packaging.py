"""zoo as users install it: a wheel, outside the checkout, that still knows its catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import zoo

ROOT = Path(__file__).resolve().parent.parent
BASE = "smollm2-135m-instruct"


def test_a_missing_shipped_catalog_is_an_error_not_an_empty_catalog(zoo_home, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("ZOO_CATALOG", str(tmp_path / "nowhere.json"))
    result = zoo("pull", BASE, ok=False)
    assert result.exit_code == 1
    assert "shipped catalog" in result.stderr and "missing" in result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (built,) = out.glob("zoo-*.whl")
    return built


def test_the_wheel_carries_the_shipped_catalog(wheel):
    with zipfile.ZipFile(wheel) as archive:
        packaged = json.loads(archive.read("zoo/catalog/shipped.json"))
        names = set(archive.namelist())
    assert packaged == json.loads((ROOT / "registry.json").read_text())
    assert {"zoo/schema/registry.schema.json", "zoo/data/pirate.jsonl"} <= names


@pytest.mark.slow
def test_installed_wheel_pulls_the_embedded_base_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "ZOO_HOME": str(tmp_path / "home")}
    env.pop("ZOO_CATALOG", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, text=True,
                              capture_output=True, timeout=600)

    where = run("-c", "import zoo; print(zoo.__file__)")
    assert where.stdout.strip() == str(target / "zoo" / "__init__.py"), where.stderr
    pulled = run("-m", "zoo", "pull", BASE)
    assert pulled.returncode == 0, pulled.stderr
    listed = run("-m", "zoo", "list", "--json")
    assert [e["name"] for e in json.loads(listed.stdout)] == [BASE]
    assert run("-m", "zoo", "verify").returncode == 0
