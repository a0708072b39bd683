"""Every error a zoo user can cause, in one place.

Each class subclasses a builtin for compatibility with code that catches the
builtin, and carries a ``hint``: the next thing the user should do. The CLI
prints ``error: <message>`` and the hint on one line each; nothing else.
"""

from __future__ import annotations


class ZooError(Exception):
    """Base class: a problem the user can fix, with a hint that says how."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class InvalidName(ZooError, ValueError):
    hint = "Names are 'name' or 'org/name' of lowercase letters, digits, '.', '_' and '-'."

    def __init__(self, name: str, why: str):
        super().__init__(f"invalid name {name!r}: {why}")
        self.name = name


class UnknownEntry(ZooError, KeyError):
    hint = "Run 'zoo list' to see what is registered."

    def __init__(self, name: str, what: str = "entry", *, hint: str | None = None):
        super().__init__(f"no {what} named {name!r}", hint=hint)
        self.name = name


class DuplicateEntry(ZooError, FileExistsError):
    hint = ("Pick another --name; for an adapter, --new-version adds this content as the "
            "name's next version.")

    def __init__(self, name: str):
        super().__init__(f"{name!r} is already registered")
        self.name = name


class NameCollision(DuplicateEntry):
    hint = "A name and ORG/NAME names under it cannot both exist: pick another --name."

    def __init__(self, name: str, others: list[str]):
        ZooError.__init__(self, f"{name!r} would share storage with {', '.join(others)}")
        self.name, self.others = name, others


class RegistryError(ZooError, OSError):
    hint = "Restore registry.json from a backup, or set ZOO_HOME to a fresh directory."


class MalformedEntry(RegistryError):
    """One entry of a registry is not one zoo could have written (edited by hand, or an index
    on a Hub that anyone may write)."""

    hint = ("Mend or remove it in registry.json by hand (zoo writes every entry it makes "
            "whole), or restore the file from a backup.")

    def __init__(self, name: str, why: str):
        super().__init__(f"registry entry {name!r} is malformed: {why}")
        self.name = name
        self.why = why


class FormatError(ZooError, ValueError):
    """A file zoo was given is missing, unreadable or not what it should be."""

    hint = "Check the path: zoo expects a PEFT adapter, a zoo bottleneck adapter or a model dir."

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.path = path


class BaseNotRegistered(FormatError):
    """An adapter names a base this zoo does not have (``hub_id``: the Hub repo it names,
    when it names one)."""

    def __init__(self, message: str, *, named: str | None, hub_id: str | None,
                 hint: str | None = None):
        super().__init__(message, hint=hint)
        self.named, self.hub_id = named, hub_id


class ShapeMismatch(ZooError, ValueError):
    hint = "The adapter was trained on another base: pass the right one with --base."

    def __init__(self, tensor: str, expected: tuple, got: tuple, base: str):
        super().__init__(
            f"tensor {tensor} has shape {list(got)}, but base {base!r} needs {list(expected)}"
        )
        self.tensor, self.expected, self.got, self.base = tensor, expected, got, base


class BaseMismatch(ZooError, ValueError):
    hint = "Use adapters registered against the same base, or re-register with --base."


class IntegrityError(ZooError, ValueError):
    """A file's content no longer matches the hash zoo recorded for it."""

    hint = "Re-add or re-pull the entry; the stored copy was changed or damaged."

    def __init__(self, message: str, *, files: list[str] | None = None,
                 hint: str | None = None):
        super().__init__(message, hint=hint)
        self.files = files or []


class NotSupported(ZooError, ValueError):
    """Asked for something zoo refuses to do with this entry (with the reason)."""


class OutputExists(ZooError, FileExistsError):
    hint = "Pass --force to replace it, or choose another --out."

    def __init__(self, path: str):
        super().__init__(f"output {path} already exists")
        self.path = path


class DataError(ZooError, ValueError):
    hint = "Each line must be {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}."

    def __init__(self, path: str, line: int, why: str):
        super().__init__(f"{path}:{line}: {why}")
        self.path, self.line = path, line


class VerificationFailed(ZooError, ArithmeticError):
    hint = "The output was not kept. Re-run with ZOO_DEBUG=1 and report the numbers."


class HubError(ZooError, OSError):
    """Talking to the Hub failed; the message never contains the token."""

    hint = "Check HF_ENDPOINT, the repo name and your token (HF_TOKEN or --token)."


class IndexChanged(HubError):
    """A commit named a parent that is no longer the head (HTTP 412): someone wrote first."""

    hint = "Run the command again: it reads the new state and merges."


class MeterError(ZooError, OSError):
    """The home's usage database cannot be read as zoo's meter."""

    hint = ("Move it aside: zoo then starts an empty meter (what it counted is lost to "
            "'zoo usage' and to the monthly limits).")


class ServeError(ZooError, RuntimeError):
    hint = "Run 'zoo list --base BASE' to see what can be served."
