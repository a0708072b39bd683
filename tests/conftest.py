"""Shared fixtures: every test gets its own zoo home; tiny real models are built once."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import jsonschema
import pytest
from hypothesis import settings

from tests import factory

# huggingface_hub fixes some settings (its endpoint, the hosts it trusts) when first imported.
# Import it now, with no HF_ENDPOINT, so every test sees what a process that imported it before
# choosing an endpoint sees, whatever order the tests run in: zoo reads HF_ENDPOINT per call.
os.environ.pop("HF_ENDPOINT", None)
# With hf_xet installed, huggingface_hub uploads through Xet, which the test Hub does not
# speak; without it, through the Git LFS protocol the test Hub implements (and the real
# Hub accepts). Read at import, like the endpoint.
os.environ["HF_HUB_DISABLE_XET"] = "1"
import huggingface_hub.constants  # noqa: E402,F401  (the package itself loads lazily)

# zoo's persisted file-hash cache (zoo/catalog/integrity.py): the session's own, not the
# user's; the vLLM servers tests start inherit it.
# Removed when the session ends, with the servers it started already stopped.
_HASH_CACHE_DIR = tempfile.mkdtemp(prefix="zoo-hashes-")
atexit.register(shutil.rmtree, _HASH_CACHE_DIR, ignore_errors=True)
os.environ["ZOO_HASH_CACHE"] = os.path.join(_HASH_CACHE_DIR, "hashes.sqlite")

# Property tests: fresh examples on a developer's run, the same ones in CI (a failure found
# there can be re-run; one found locally is pinned as a test).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

SCHEMA = json.loads((Path(__file__).parent.parent / "zoo/schema/registry.schema.json").read_text())


def check_registry(path: Path) -> dict:
    """Validate a registry file against the JSON Schema; return its content."""
    data = json.loads(path.read_text())
    jsonschema.validate(data, SCHEMA)
    for name, entry in data["entries"].items():
        assert entry["name"] == name
    return data


@pytest.fixture(autouse=True)
def zoo_home(tmp_path, monkeypatch) -> Path:
    """Point every path and setting zoo or the HF libraries read at this test's tmp dir."""
    home = tmp_path / "zoo-home"
    monkeypatch.setenv("ZOO_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("ZOO_DEBUG", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield home
    registry = home / "registry.json"
    if registry.exists():  # every registry a test leaves behind must match the schema
        check_registry(registry)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> factory.Models:
    """Tiny real models (a Llama and a GPT-2), saved as transformers checkpoints."""
    return factory.Models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory) -> Path:
    """A zoo home with the real embedded base pulled (built once per session)."""
    home = tmp_path_factory.mktemp("smollm2-home")
    from zoo.apps.pull import pull
    from zoo.catalog.registry import Registry

    pull("smollm2-135m-instruct", registry=Registry(home))
    return home


@pytest.fixture(scope="session")
def smollm2_w8a8_home(smollm2_home, tmp_path_factory) -> Path:
    """The real base's home with its int8 variant, made once per session as zoo serve makes
    it (calibrating takes one to two minutes here); the tests that serve it link from it."""
    from zoo.catalog.registry import Registry
    from zoo.serve.launch import ServeOptions, prepare_base

    home = linked_home(smollm2_home, tmp_path_factory.mktemp("smollm2-w8a8") / "home")
    prepare_base(ServeOptions(base="smollm2-135m-instruct", quantization="w8a8"), Registry(home))
    return home


def linked_home(source: Path, home: Path) -> Path:
    """A private copy of a home whose files are hard links (no copy of the weights).

    zoo never writes a stored file in place (it writes a new one and renames),
    so the copies stay independent; tests that damage a file unlink it first.
    """
    shutil.copytree(source, home, copy_function=os.link)
    return home


@pytest.fixture
def real_home(smollm2_home, tmp_path, monkeypatch) -> Path:
    """A private home holding the real base."""
    home = linked_home(smollm2_home, tmp_path / "real-home")
    monkeypatch.setenv("ZOO_HOME", str(home))
    return home


TENANT_KEYS = {"acme": "sk-acme-0000001", "globex": "sk-globex-0000001",
               "ops": "sk-ops-00000001"}


@pytest.fixture(scope="session")
def tenant_engine(smollm2_home, tmp_path_factory):
    """One real engine shared by the modules that need tenants, versions and the pages: the
    16-bit base, acme/x in two versions (v1 current), globex/g, tenants acme (weight 1),
    globex (weight 3) and ops (an operator); a few sequences at a time, so that requests
    queue and the order of admission shows."""
    from types import SimpleNamespace

    from tests.factory import write_random_lora
    from zoo.catalog.registry import Registry
    from zoo.catalog.store import add
    from zoo.serve.launch import ServeOptions, free_port, running_server

    home = linked_home(smollm2_home, tmp_path_factory.mktemp("tenants") / "home")
    registry = Registry(home)
    base_dir = home / "bases" / "smollm2-135m-instruct"
    root = home.parent / "loras"
    for version in (1, 2):
        lora = write_random_lora(root / f"v{version}", base_dir, seed=70 + version, scale=0.05,
                                 targets=("q_proj", "v_proj"))
        add(lora, "acme/x", "smollm2-135m-instruct", registry=registry, new_version=version > 1)
    add(write_random_lora(root / "g", base_dir, seed=90, scale=0.05, targets=("q_proj",)),
        "globex/g", "smollm2-135m-instruct", registry=registry)
    keys = home.parent / "keys.json"
    keys.write_text(json.dumps({"tenants": {
        "acme": {"keys": [TENANT_KEYS["acme"]], "weight": 1},
        "globex": {"keys": [TENANT_KEYS["globex"]], "weight": 3},
        "ops": {"keys": [TENANT_KEYS["ops"]], "adapters": ["*"]}}}))
    options = ServeOptions(base="smollm2-135m-instruct", quantization="none", port=free_port(),
                           api_keys=keys,
                           extra_args=("--enable-prompt-tokens-details", "--max-num-seqs", "8"))
    with running_server(options, registry, log_file=home.parent / "vllm.log") as server:
        yield SimpleNamespace(url=server.url, registry=registry, home=home, keys=keys,
                              root=server.url.removesuffix("/v1"))


@pytest.fixture(scope="session")
def engine_reports() -> dict:
    """What each vLLM engine the session started reported about its weights (/zoo/engine)."""
    return {}


def pytest_sessionfinish(session, exitstatus):
    """Every zoo home the session made matches the schema (the per-test home is checked by
    its fixture; this covers the session's, the served, replica and Hub ones), and no test
    was skipped: vLLM's tests run everywhere the suite does (a broken vLLM install fails
    the bootstrap, and a test that skips itself fails the run)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and exitstatus == 0:
        invalid = []
        # a registry zoo wrote has its writers' lock beside it (tests that damage one on
        # purpose write the file alone)
        for lock in factory.getbasetemp().rglob("registry.json.lock"):
            try:
                check_registry(lock.with_suffix(""))
            except (jsonschema.ValidationError, AssertionError, ValueError, OSError) as error:
                invalid.append(f"{lock.with_suffix('')}: {str(error).splitlines()[0]}")
        if invalid:
            reporter.write_line("error: registries that do not match the schema:\n  " +
                                "\n  ".join(invalid), red=True)
            session.exitstatus = 1
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and session.exitstatus == 0:
        names = ", ".join(getattr(r, "nodeid", "?") for r in skipped[:5])
        reporter.write_line(f"error: {len(skipped)} tests were skipped ({names}); the suite "
                            "runs every test", red=True)
        session.exitstatus = 1
