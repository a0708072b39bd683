"""Durable metering and per-tenant limits, in SQLite in the zoo home (``usage.db``).

Every request that reaches the engine is a row (time, tenant, model version, prompt and
completion tokens, status), committed before the response's last byte is sent: a crash
loses no request a client received whole. SQLite in WAL mode, because it ships with
Python, needs no server, lets every process on the machine (replicas of one home, ``zoo
usage``) read while one writes, and a committed transaction survives the process that
made it being killed (``synchronous=NORMAL``: what a power cut can lose is the last
transactions, which no client received either).

Limits (``concurrent``, ``requests_per_minute``, ``tokens_per_minute``,
``tokens_per_month``, per tenant in the keys file) are checked in the same database in
one ``BEGIN IMMEDIATE`` transaction before a request is admitted, and the admission is
recorded as in flight (with the tokens it may use: its prompt's estimate and its
``max_tokens``), so replicas sharing a home share the limits. In-flight rows of a server
that died are dropped when any server checks (a row names its server by pid and start
time, :mod:`zoo.core.process`: a restarted container's new server with the dead one's pid
does not inherit its reservations).
"""

from __future__ import annotations

import functools
import math
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from zoo.core.process import alive, identity
from zoo.errors import MeterError

DB_FILE = "usage.db"
MINUTE = 60.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, tenant TEXT NOT NULL, model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    status INTEGER NOT NULL, server INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS usage_by_tenant ON usage (tenant, at);
CREATE INDEX IF NOT EXISTS usage_by_time ON usage (at);
CREATE TABLE IF NOT EXISTS inflight (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, at REAL NOT NULL, reserved INTEGER NOT NULL,
    server INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS monthly (
    tenant TEXT NOT NULL, month TEXT NOT NULL, requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL, PRIMARY KEY (tenant, month));
"""


TABLES = ("usage", "inflight", "monthly")


@functools.cache
def _expected_columns() -> dict[str, list[str]]:
    """The columns a meter's tables must have, from an empty meter made in memory."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        return _columns(db)
    finally:
        db.close()


def _columns(db: sqlite3.Connection) -> dict[str, list[str]]:
    return {t: [row[1] for row in db.execute(f"PRAGMA table_info({t})")] for t in TABLES}


def check_meter(home: Path) -> None:
    """The home's meter, when it has one, opens: every request is counted in it (said
    before a server starts, not by each request)."""
    if (Path(home) / DB_FILE).exists():
        Meter(home, server=0).close()


@dataclass(frozen=True)
class Admission:
    ok: bool
    headers: dict[str, str] = field(default_factory=dict)  # OpenAI's x-ratelimit-*
    retry_after: float = 0.0
    reason: str = ""


def month_of(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m")


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1m30s``, ``6s``, ``20ms``."""
    if seconds < 1:
        return f"{max(1, int(seconds * 1000))}ms"
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class Meter:
    """One connection (use it from one thread), to the home's usage database."""

    def __init__(self, home: Path, server: int | None = None):
        self.path = Path(home) / DB_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.server = server if server is not None else identity()  # see zoo.core.process
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:  # checked before anything is written: another program's database stays as it was
            expected, found = _expected_columns(), _columns(self.db)
            wrong = [t for t in TABLES if found[t] and found[t] != expected[t]]
            if not wrong:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:  # not a database at all, or a damaged one
            self.db.close()
            raise MeterError(f"{self.path} is not a usage meter zoo can read ({exc})") from None
        if wrong:
            self.db.close()
            raise MeterError(f"{self.path} is not zoo's usage meter: its tables "
                             f"{', '.join(wrong)} have other columns than zoo's")

    def close(self) -> None:
        self.db.close()

    # -- admission -------------------------------------------------------------------------
    def admit(self, request_id: str, tenant: str, limits: dict[str, int], reserve: int,
              now: float | None = None) -> Admission:
        """Check ``tenant``'s limits with this request counted, and record it in flight
        when it fits; a 429's numbers when it does not."""
        now = time.time() if now is None else now
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._drop_dead_servers()
            headers: dict[str, str] = {}
            refusal = None
            if "concurrent" in limits:
                running = db.execute("SELECT COUNT(*) FROM inflight WHERE tenant = ?",
                                     (tenant,)).fetchone()[0]
                if running + 1 > limits["concurrent"]:
                    refusal = ("concurrent", 1.0,
                               f"{running} requests of yours are running, the limit is "
                               f"{limits['concurrent']}")
            if "requests_per_minute" in limits or "tokens_per_minute" in limits:
                since = now - MINUTE
                done = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(prompt_tokens + completion_tokens), 0), "
                    "MIN(at) FROM usage WHERE tenant = ? AND at > ?", (tenant, since)).fetchone()
                flying = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(reserved), 0), MIN(at) FROM inflight "
                    "WHERE tenant = ? AND at > ?", (tenant, since)).fetchone()
                oldest = min([t for t in (done[2], flying[2]) if t is not None], default=now)
                reset = max(0.0, oldest + MINUTE - now)
                for kind, used, per in (("requests", done[0] + flying[0] + 1,
                                         limits.get("requests_per_minute")),
                                        ("tokens", done[1] + flying[1] + reserve,
                                         limits.get("tokens_per_minute"))):
                    if per is None:
                        continue
                    headers[f"x-ratelimit-limit-{kind}"] = str(per)
                    headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, per - used))
                    headers[f"x-ratelimit-reset-{kind}"] = _duration(reset)
                    if used > per and refusal is None:
                        refusal = (f"{kind}_per_minute", reset or 1.0,
                                   f"{used} {kind} in the last minute with this one, the "
                                   f"limit is {per}")
            if "tokens_per_month" in limits and refusal is None:
                month = month_of(now)
                used = db.execute("SELECT COALESCE(SUM(tokens), 0) FROM monthly WHERE tenant = ? "
                                  "AND month = ?", (tenant, month)).fetchone()[0]
                used += db.execute("SELECT COALESCE(SUM(reserved), 0) FROM inflight WHERE "
                                   "tenant = ?", (tenant,)).fetchone()[0] + reserve
                if used > limits["tokens_per_month"]:
                    start_next = datetime.fromtimestamp(now, UTC).replace(
                        day=1, hour=0, minute=0, second=0, microsecond=0)
                    start_next = start_next.replace(
                        year=start_next.year + start_next.month // 12,
                        month=start_next.month % 12 + 1)
                    refusal = ("tokens_per_month", start_next.timestamp() - now,
                               f"{used} tokens this month with this one, the limit is "
                               f"{limits['tokens_per_month']}")
            if refusal is not None:
                db.execute("COMMIT")
                kind, wait, why = refusal
                return Admission(False, headers, max(1.0, math.ceil(wait)), why)
            db.execute("INSERT OR REPLACE INTO inflight VALUES (?, ?, ?, ?, ?)",
                       (request_id, tenant, now, reserve, self.server))
            db.execute("COMMIT")
            return Admission(True, headers)
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _drop_dead_servers(self) -> None:
        for (server,) in self.db.execute("SELECT DISTINCT server FROM inflight").fetchall():
            if not alive(server):
                self.db.execute("DELETE FROM inflight WHERE server = ?", (server,))

    # -- metering --------------------------------------------------------------------------
    def record(self, request_id: str | None, tenant: str, model: str, prompt: int,
               completion: int, status: int, now: float | None = None) -> None:
        """The request's usage, durable when this returns; its in-flight row goes."""
        now = time.time() if now is None else now
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if request_id is not None:
                db.execute("DELETE FROM inflight WHERE id = ?", (request_id,))
            db.execute("INSERT INTO usage (at, tenant, model, prompt_tokens, completion_tokens,"
                       " status, server) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (now, tenant, model, prompt, completion, status, self.server))
            db.execute("INSERT INTO monthly VALUES (?, ?, 1, ?) ON CONFLICT (tenant, month) DO "
                       "UPDATE SET requests = requests + 1, tokens = tokens + excluded.tokens",
                       (tenant, month_of(now), prompt + completion))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def release(self, request_id: str) -> None:
        """A request admitted but never answered (the client went away): not in flight."""
        self.db.execute("DELETE FROM inflight WHERE id = ?", (request_id,))

    def report(self, tenant: str | None = None, since: float | None = None,
               by: str = "adapter", server: int | None = None) -> list[dict]:
        """Requests and tokens, grouped by ``adapter`` (model version and tenant),
        ``tenant`` or ``day``; ``server``: only what that server process answered."""
        groups = {"adapter": "model, tenant", "tenant": "tenant",
                  "day": "date(at, 'unixepoch'), tenant"}
        if by not in groups:
            raise ValueError(f"by must be one of {', '.join(groups)}")
        where, args = [], []
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if since is not None:
            where.append("at >= ?")
            args.append(since)
        if server is not None:
            where.append("server = ?")
            args.append(server)
        keys = {"adapter": ["model", "tenant"], "tenant": ["tenant"], "day": ["day", "tenant"]}[by]
        sql = (f"SELECT {groups[by]}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
               f"SUM(status = 200) FROM usage {'WHERE ' + ' AND '.join(where) if where else ''} "
               f"GROUP BY {groups[by]} ORDER BY {groups[by]}")
        rows = []
        for values in self.db.execute(sql, args).fetchall():
            named = dict(zip(keys, values[:len(keys)], strict=True))
            requests, prompt, completion, ok = values[len(keys):]
            rows.append({**named, "requests": requests, "prompt_tokens": prompt,
                         "completion_tokens": completion, "ok": ok})
        return rows


def parse_since(text: str | None) -> float | None:
    """``YYYY-MM-DD`` (UTC) or a span back from now: ``30m``, ``12h``, ``7d``."""
    if not text:
        return None
    import re

    from zoo.errors import ZooError

    span = re.fullmatch(r"(\d+)([mhd])", text)
    if span:
        return time.time() - int(span[1]) * {"m": 60, "h": 3600, "d": 86400}[span[2]]
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise ZooError(f"--since {text!r} is neither a date nor a span",
                       hint="Write 2026-11-01, or 30m, 12h, 7d.") from None
