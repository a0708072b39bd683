"""Who may use which model on a ``zoo serve`` server, decided from the registry.

Shared by the LoRA resolver (inside vLLM's engine client) and the ASGI
middleware (in front of vLLM's routes); neither imports the other. The
registry is re-read when its file changes, so adapters added or removed
while the server runs are seen on the next request.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from zoo.catalog.integrity import changed_files
from zoo.catalog.registry import Catalog, Registry
from zoo.catalog.versions import (
    SEPARATOR,
    answering,
    beyond_engine,
    label,
    number_of,
    record_engine,
    split_ref,
)
from zoo.core.files import write_json_atomic
from zoo.core.records import AdapterEntry
from zoo.core.tables import is_count
from zoo.errors import FormatError, MalformedEntry, ZooError

HOME_VARIABLE = "ZOO_HOME"
BASE_VARIABLE = "ZOO_SERVE_BASE"
KEYS_VARIABLE = "ZOO_SERVE_API_KEYS"
RANK_VARIABLE = "ZOO_SERVE_MAX_LORA_RANK"
MODEL_VARIABLE = "ZOO_SERVE_MODEL_DIR"  # the served checkpoint (its smoothing, if any)
TARGETS_VARIABLE = "ZOO_SERVE_TARGETS"  # the projections the served adapters train (a,b,c)
# the modules the engine gives LoRA layers (--lora-target-modules, a,b,c); unset: all it can
WRAPPED_VARIABLE = "ZOO_SERVE_WRAPPED"
# vLLM's fused projections, by the names adapters train (a deployment may name either)
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                  "gate_up_proj": ("gate_proj", "up_proj")}
logger = logging.getLogger("zoo.serve")

# The tenant of the request being handled, set by the middleware for the request's task;
# the resolver (called by vLLM inside that task) reads it, so both decide for one tenant.
NOT_VETTED = object()
REQUEST_TENANT: ContextVar = ContextVar("zoo_request_tenant", default=NOT_VETTED)
# Content hash of each adapter as the resolver handed it to the engine (by name): a name
# re-registered with other content is unloaded before its next request (middleware).
LOADED_HASHES: dict[str, str] = {}
# Why the engine could not load a version the resolver handed it (its last failure), until
# a request for it is answered or it is unloaded: the pages list it apart from the loaded.
LOAD_FAILURES: dict[str, str] = {}
LOAD_COUNT = [0]  # adapter versions the resolver handed the engine (cold loads), this process


@dataclass(frozen=True)
class Decision:
    """The answer for one model name: HTTP status, message, and for an adapter the version
    that answers (``label``, ``NAME:vN``), its files and content hash."""

    status: int
    message: str = ""
    path: Path | None = None
    content_hash: str | None = None
    label: str | None = None
    files: dict[str, dict] | None = None  # an adapter's, as registered

    @property
    def ok(self) -> bool:
        return self.status == 200


# The prefix-cache salt the middleware sets on every request also tells the engine's
# scheduler whose request it is (zoo/serve/fair.py): ``zoo1.TENANT.HMAC``.
SALT_PREFIX = "zoo1."
ANONYMOUS = "-"


def salt_for(tenant: str, secret_hash: str) -> str:
    return f"{SALT_PREFIX}{tenant}.{secret_hash}"


def tenant_of_salt(salt) -> str:
    if isinstance(salt, str) and salt.startswith(SALT_PREFIX):
        tenant, _, _ = salt[len(SALT_PREFIX):].rpartition(".")
        return tenant or ANONYMOUS
    return ANONYMOUS


HASHED = "sha256:"
TENANT_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_HASHED_KEY = re.compile(re.escape(HASHED) + "[0-9a-f]{64}")


def hash_key(key: str) -> str:
    """How a keys file can hold a key without holding the secret: ``sha256:HEX``."""
    return HASHED + hashlib.sha256(key.encode()).hexdigest()


LIMITS = ("concurrent", "requests_per_minute", "tokens_per_minute", "tokens_per_month")


@dataclass(frozen=True)
class Tenant:
    name: str
    keys: tuple[str, ...]  # plain keys, or their hash_key()
    adapters: tuple[str, ...]  # fnmatch patterns; "NAME/*" by default
    weight: float = 1.0  # its share of the engine when tenants wait (fair.py)
    limits: dict[str, int] = field(default_factory=dict)  # LIMITS, each optional

    def may_use(self, adapter: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)

    @property
    def operator(self) -> bool:
        """A tenant that may use every adapter also reads every tenant's metrics."""
        return "*" in self.adapters

    def holds(self, key: str) -> bool:
        hashed = hash_key(key)
        return any(hmac.compare_digest((hashed if k.startswith(HASHED) else key).encode(), k.encode())
                   for k in self.keys)


def add_key(path: Path, tenant: str, adapters: tuple[str, ...] = ()) -> str:
    """Make a new random key for TENANT (created when new), store only its hash in the keys
    file at PATH (created when missing), and return the key: the one time it is shown."""
    if not re.fullmatch(TENANT_NAME, tenant):
        raise ZooError(f"tenant name {tenant!r} is not valid",
                       hint="Use letters, digits, '.', '_' and '-'.")
    key = "sk-zoo-" + secrets.token_urlsafe(24)
    with FileLock(f"{path}.lock"):  # a malformed file is refused before anything changes
        data = _read_keys_file(path)[0] if path.exists() else {"tenants": {}}
        spec = data["tenants"].setdefault(tenant, {"keys": []})
        if adapters:
            spec["adapters"] = list(adapters)
        spec["keys"].append(hash_key(key))
        write_json_atomic(path, data)
    return key


def fingerprint(key: str) -> str:
    """How a stored key is named: the first 12 hex digits of its SHA-256 (a hashed key's
    own digits). It names the key without revealing it."""
    return _digest(key)[:12]


def _digest(stored: str) -> str:
    return (stored if stored.startswith(HASHED) else hash_key(stored)).removeprefix(HASHED)


def _named(keys: tuple[str, ...], key: str) -> list[str]:
    """The stored keys ``key`` names: the key itself (stored plain or hashed), or the start
    of their digest (8 hex digits or more)."""
    exact = [k for k in keys if key in (k, _digest(k)) or k == hash_key(key)]
    if exact or not re.fullmatch(r"[0-9a-f]{8,64}", key):
        return exact
    return [k for k in keys if _digest(k).startswith(key)]


def revoke_key(path: Path, tenant: str, key: str | None = None) -> int:
    """Remove one key of TENANT, named by ``key``: the key itself, or the start of its
    fingerprint (8 hex digits or more, matching one key only). With ``key`` None, remove
    TENANT and all its keys. Return how many keys went. A running server refuses them from
    its next request on (it re-reads the file when it changes). A tenant is never left
    without keys: removing its last one takes removing the tenant."""
    with FileLock(f"{path}.lock"):  # a malformed file is refused before anything changes
        data, tenants = _read_keys_file(path)
        known = {t.name: t for t in tenants}
        if tenant not in known:
            raise ZooError(f"{path} has no tenant {tenant!r}",
                           hint=f"'zoo keys list --file {path}' lists them.")
        keys = known[tenant].keys
        if key is None:
            del data["tenants"][tenant]
            write_json_atomic(path, data)
            return len(keys)
        named = _named(keys, key)
        what = repr(key) if re.fullmatch(r"[0-9a-f]{8,64}", key) else "the key given"
        if not named:  # a key itself is never echoed: it may be someone's secret
            raise ZooError(f"no key of {tenant!r} in {path} is {what}",
                           hint="Name the key itself, or the start of its fingerprint "
                                "(8 hex digits or more; 'zoo keys list').")
        if len(named) > 1:
            raise ZooError(f"{len(named)} keys of {tenant!r} start with {what}",
                           hint="Give more of the fingerprint's digits.")
        if len(keys) == 1:
            raise ZooError(f"{tenant!r} would have no key left",
                           hint=f"'zoo keys revoke {tenant} --all' removes the tenant, or add "
                                f"its new key first ('zoo keys add {tenant}').")
        data["tenants"][tenant]["keys"] = [k for k in data["tenants"][tenant]["keys"]
                                           if k != named[0]]
        write_json_atomic(path, data)
        return 1


def load_tenants(path: Path) -> list[Tenant]:
    """Read an API keys file: ``{"tenants": {NAME: {"keys": [...], "adapters": [...],
    "weight": W, "limits": {...}}}}``, each key given plain or as ``sha256:HEX`` of the key;
    ``weight`` (default 1) is the tenant's share when tenants wait, ``limits`` any of
    ``concurrent``, ``requests_per_minute``, ``tokens_per_minute``, ``tokens_per_month``."""
    return _read_keys_file(path)[1]


def _read_keys_file(path: Path) -> tuple[dict, list[Tenant]]:
    """The keys file's JSON and its tenants, checked."""
    try:
        data = json.loads(Path(path).read_text())
        tenants = []
        for name, spec in data["tenants"].items():
            if not re.fullmatch(TENANT_NAME, name):
                raise ValueError(f"tenant name {name[:40]!r} is not valid")
            keys = tuple(spec["keys"])
            if not keys or any(not isinstance(k, str) or len(k) < 8 for k in keys):
                raise ValueError(f"tenant {name!r} needs keys: strings of 8 characters or more")
            patterns = spec.get("adapters") or []
            if not isinstance(patterns, list) or not all(isinstance(a, str) for a in patterns):
                raise ValueError(f"tenant {name!r}: adapters must be a list of name patterns")
            bad = [k for k in keys if k.startswith(HASHED) and not _HASHED_KEY.fullmatch(k)]
            if bad:
                raise ValueError(f"tenant {name!r} has a {HASHED} key that is not 64 hex digits")
            adapters = tuple(spec.get("adapters") or [f"{name}/*"])
            weight = spec.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int | float) or \
                    not 0 < weight <= 1000:
                raise ValueError(f"tenant {name!r}: weight must be a number in (0, 1000]")
            limits = spec.get("limits") or {}
            if not isinstance(limits, dict) or any(
                    k not in LIMITS or not is_count(v)
                    for k, v in limits.items()):
                raise ValueError(f"tenant {name!r}: limits are positive integers among "
                                 f"{', '.join(LIMITS)}")
            tenants.append(Tenant(name, keys, adapters, float(weight), dict(limits)))
    except FileNotFoundError:
        raise FormatError(f"API keys file {path} not found", path=str(path)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"API keys file {path} is malformed ({exc})", path=str(path), hint=(
            'Write {"tenants": {"acme": {"keys": ["sk-..."], "adapters": ["acme/*"]}}}, '
            "or make it with 'zoo keys add TENANT --file FILE'.")) from None
    return data, tenants


def _file_stamp(path: Path) -> tuple | None:
    """What changes when a file is replaced or rewritten (None: there is none)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def wrapped_modules(names: str | None) -> frozenset[str] | None:
    """The module names (``a,b,c``) an engine has LoRA layers for, as adapters name them;
    None or empty: every module vLLM can adapt. vLLM wraps a fused projection whole when
    any part of it is named, so the fused name and all its parts are in."""
    if not names:
        return None
    wrapped = {n for n in names.split(",") if n}
    for fused, parts in PACKED_MODULES.items():
        if fused in wrapped or wrapped.intersection(parts):
            wrapped.update((fused, *parts))
    return frozenset(wrapped)


@dataclass
class ServePolicy:
    registry: Registry
    base: str
    max_lora_rank: int
    tenants: list[Tenant] | None = None
    keys_path: Path | None = None  # re-read when it changes; revoked keys stop working
    model_dir: Path | None = None  # the served checkpoint; smoothed ones need adapted LoRAs
    wrapped: frozenset[str] | None = None  # the modules with LoRA layers (None: all vLLM can)
    # the last read of the registry: (catalog, its file's stamp, its served versions or
    # None until asked), swapped whole, so a thread can read the next one meanwhile
    _read: tuple | None = field(default=None, repr=False)
    _keys_stamp: tuple | None = field(default=None, repr=False)

    @classmethod
    def from_environment(cls) -> ServePolicy:
        keys = os.environ.get(KEYS_VARIABLE)
        return cls(Registry(Path(os.environ[HOME_VARIABLE])), os.environ[BASE_VARIABLE],
                   int(os.environ.get(RANK_VARIABLE, "512")),
                   load_tenants(Path(keys)) if keys else None,
                   Path(keys) if keys else None,
                   Path(os.environ[MODEL_VARIABLE]) if os.environ.get(MODEL_VARIABLE) else None,
                   wrapped_modules(os.environ.get(WRAPPED_VARIABLE)))

    def record_engine(self) -> None:
        """Leave in the home what this server's engine can load, while it runs: ``zoo
        promote`` refuses a version this server would answer with a 400."""
        record_engine(self.registry.home, self.base, self.max_lora_rank, self.wrapped)

    def lora_path(self, name: str, stored: Path, content_hash: str) -> Path:
        """What vLLM should load for an adapter: its stored files, or on a SmoothQuant-ed
        base a copy rescaled to match (made once per adapter content, then reused)."""
        from zoo.models.smoothing import SCALES_FILE

        if self.model_dir is None or not (self.model_dir / SCALES_FILE).exists():
            return stored
        from zoo.catalog.integrity import file_hash

        scales = file_hash(self.model_dir / SCALES_FILE).removeprefix("sha256:")[:16]
        cache = (self.registry.home / "cache" / "smoothed" / scales /
                 content_hash.removeprefix("sha256:")[:32])
        if not cache.exists():
            from zoo.catalog.home import new_stage
            from zoo.models.smoothing import adapt_lora, load_scales

            stage = new_stage(self.registry.home / "tmp", f"smoothed-{name}")
            adapt_lora(stored, load_scales(self.model_dir), stage)
            cache.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(stage, cache)
            except OSError:  # another process made it first: theirs is the same
                import shutil

                shutil.rmtree(stage, ignore_errors=True)
        return cache

    def current_tenants(self) -> list[Tenant] | None:
        """The tenants, re-read when the keys file changed (None: the server is open).

        A keys file that became unreadable or malformed locks everyone out until
        it is fixed: a revocation must never be undone by a typo.
        """
        if self.keys_path is None:
            return self.tenants
        stamp = _file_stamp(self.keys_path)
        if stamp != self._keys_stamp:
            self._keys_stamp = stamp
            try:
                self.tenants = load_tenants(self.keys_path)
            except ZooError as exc:
                logger.error("zoo: keys file unusable, refusing every key: %s", exc)
                self.tenants = []
        return self.tenants

    def registry_changed(self) -> bool:
        """Whether registry.json changed since it was last read (a stat)."""
        return self._read is None or _file_stamp(self.registry.path) != self._read[1]

    def reread(self, versions: bool = False) -> None:
        """Read the registry again (with ``versions``, what it serves too) and swap the read
        in whole: a thread may do this while requests go on with the previous read."""
        stamp = _file_stamp(self.registry.path)  # first: a change during the read shows next
        catalog = self.registry.load()
        self._read = (catalog, stamp, self._servable(catalog) if versions else None)

    def catalog(self) -> Catalog:
        """The registry, re-read only when its file changed."""
        return self._current()[0]

    def _current(self) -> tuple:
        if self.registry_changed():
            self.reread()
        return self._read

    def served_adapters(self) -> list[AdapterEntry]:
        """Adapters of the base that can be served now (their current versions): servable,
        fitting, intact."""
        return [a for a in self.catalog().adapters(base=self.base, skip_malformed=True)
                if a.servable and self.adapter(a.name).ok]

    def served_versions(self) -> dict[str, str]:
        """Every version of the served adapters by label (``NAME:vN``) -> content hash: what
        the engine may have loaded while it stays registered (once per registry change)."""
        read = self._current()
        if read[2] is None:
            read = self._read = (read[0], read[1], self._servable(read[0]))
        return read[2]

    def _servable(self, catalog: Catalog) -> dict[str, str]:
        versions = {label(a.name, n): r.content_hash
                    for a in catalog.adapters(base=self.base, skip_malformed=True)
                    for n, r in a.all_versions().items() if r.servable}
        for name, why in catalog.malformed.items():  # once per read of the registry
            logger.error("zoo: not serving %s: %s", name, why)
        return versions

    def adapter(self, ref: str, sticky: str | None = None, content: bool = True) -> Decision:
        """Whether ``ref`` (``NAME``, ``NAME:vN`` or ``NAME:ALIAS``) is an adapter version
        this server serves, which one answers, and where its files are. ``NAME`` alone is
        its current version, or its canary for the share of end users (``sticky``: who the
        request is for; None: a coin toss) the canary is set to. ``content=False`` checks
        the files' presence and sizes only (:meth:`content_checked` does the rest)."""
        try:
            name, which = split_ref(ref)
        except ZooError:
            return Decision(404, f"The model `{ref[:120]}` does not exist.")
        try:
            entry = self.catalog().entries.get(name)
        except MalformedEntry as exc:  # the detail is the operator's, in the server's log
            logger.error("zoo: not serving %s: %s", name, exc.why)
            return Decision(500, f"The adapter `{name}` cannot be served: its registry entry "
                                 f"is malformed. The server's log says how.")
        if not isinstance(entry, AdapterEntry):
            return Decision(404, f"The model `{name}` does not exist: it is neither the base "
                                 f"`{self.base}` nor an adapter registered for it.")
        try:
            number = number_of(entry, which) if which else answering(entry, sticky)
        except ZooError as exc:
            return Decision(404, f"The model `{ref[:120]}` does not exist: {exc.message}.")
        record = entry.all_versions()[number]
        tag = label(name, number)
        if record.base != self.base:
            return Decision(404, f"The model `{ref}` is an adapter of `{record.base}`; this "
                                 f"server serves `{self.base}`.")
        if not record.servable:
            return Decision(404, f"The model `{tag}` is registered but vLLM cannot serve it: "
                                 f"{record.servable_reason}.")
        why = beyond_engine(record, self.max_lora_rank, self.wrapped)
        if why:
            return Decision(400, f"Adapter `{tag}` {why}.")
        if record.path is None:
            return Decision(404, f"The model `{tag}` is registered but its files are not in "
                                 f"this zoo.")
        path = self.registry.home / record.path
        decision = Decision(200, path=path, content_hash=record.content_hash, label=tag,
                            files=record.files)
        if content:
            return self.content_checked(decision)
        return self._changed(decision, changed_files(path, record.files, content=False))

    def content_checked(self, decision: Decision) -> Decision:
        """An adapter's decision after its files' content is checked against the hashes it
        was registered with (reading files whose hashes no cache knows)."""
        return self._changed(decision, changed_files(decision.path, decision.files))

    @staticmethod
    def _changed(decision: Decision, changed: list[str]) -> Decision:
        if not changed:
            return decision
        return Decision(422, f"Adapter `{decision.label}` cannot be served: its files changed "
                             f"since it was registered ({', '.join(changed)}). Re-add or "
                             f"re-pull it.")

    def tenant_for(self, key: str | None) -> Tenant | None:
        tenants = self.current_tenants()
        if tenants is None or not key:
            return None
        for tenant in tenants:
            if tenant.holds(key):
                return tenant
        return None

    def authorize(self, tenant: Tenant | None, model: str | None) -> Decision:
        """Whether this tenant may use ``model`` (the base, or its own adapters)."""
        if self.current_tenants() is None or not model or model == self.base:
            return Decision(200)
        if tenant is None:
            return Decision(401, "Missing or unknown API key.")
        model = model.partition(SEPARATOR)[0]  # a version is its name's
        if not tenant.may_use(model):
            return Decision(403, f"Tenant `{tenant.name}` may not use `{model}`: only the base "
                                 f"and its own adapters ({', '.join(tenant.adapters)}).")
        return Decision(200)


@functools.cache
def shared_policy() -> ServePolicy:
    """This process's policy, from the environment: the middleware's, the resolver's and
    the pages', so one read of the registry per change serves them all (the middleware
    makes it beside the event loop)."""
    return ServePolicy.from_environment()
