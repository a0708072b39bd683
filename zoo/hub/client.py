"""Talking to a Hub: where it is, the token, and one error per way it can fail.

Settings are read when a call is made, not at import: ``HF_ENDPOINT`` (another
Hub: self-hosted, a mirror, the test double), ``HF_TOKEN`` (or ``--token``),
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` / ``HF_HOME``. The token is never written
to the registry, a log line or an error message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import HubError, IndexChanged

DEFAULT_ENDPOINT = "https://huggingface.co"
Log = Callable[[str], None]


@dataclass(frozen=True)
class HubContext:
    """Where the Hub is and how to talk to it, read from the environment at call time."""

    endpoint: str
    token: str | None
    cache_dir: Path
    offline: bool

    @classmethod
    def from_environment(cls, token: str | None = None) -> HubContext:
        home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "huggingface")
        return cls(
            endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            token=token or os.environ.get("HF_TOKEN") or None,
            cache_dir=Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")),
            offline=os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"))

    def api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token or False)

    def scrub(self, text: str) -> str:
        return text.replace(self.token, "<token>") if self.token else text


@contextmanager
def hub_errors(ctx: HubContext, repo: str, revision: str | None = None) -> Iterator[None]:
    """Turn whatever huggingface_hub raises into one HubError line that says what to do."""
    from huggingface_hub import errors

    try:
        yield
    except HubError:
        raise
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError) as exc:
        if not ctx.offline and "offline" not in str(exc).lower():
            raise _unreachable(ctx, exc) from None
        raise HubError(f"HF_HUB_OFFLINE is set and {repo} is not in the local cache",
                       hint="Unset HF_HUB_OFFLINE, or pull it once while online.") from None
    except errors.HFValidationError as exc:
        raise HubError(f"not a valid Hub repo id: {exc}",
                       hint="Use ORG/NAME with letters, digits, '-', '_' and '.'.") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"revision {revision!r} does not exist in {repo}",
                       hint="Check the branch name, or leave out @REVISION for main.") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 412:
            raise IndexChanged(f"{repo} changed since it was read (412)") from None
        if status == 401 and ctx.token:
            raise HubError(f"{ctx.endpoint} refused the token (401)",
                           hint="Check HF_TOKEN or --token.") from None
        if status == 403:
            raise HubError(f"the token may not write to {repo} (403)",
                           hint="Use a token with write access to that namespace.") from None
        if isinstance(exc, errors.RepositoryNotFoundError) or status in (401, 404):
            raise HubError(f"repo {repo} not found at {ctx.endpoint}",
                           hint="Check the name; a private repo needs HF_TOKEN; "
                                "'zoo push NAME --repo ORG/NAME' creates one.") from None
        raise HubError(f"the Hub answered {status}: {ctx.scrub(str(exc).splitlines()[0])}"
                       ) from None
    except OSError as exc:
        raise _unreachable(ctx, exc) from None
    except Exception as exc:
        if "connect" in type(exc).__name__.lower() or "timeout" in type(exc).__name__.lower():
            raise _unreachable(ctx, exc) from None
        raise


def ensure_repo(api, repo: str, **options) -> None:
    """Create REPO unless it exists. When the token may not create repos but the repo exists,
    huggingface_hub answers with the repo's URL, which it cannot parse on an endpoint other
    than the one set when it was imported (HfUriError); the repo exists then, which is all
    this needs to know."""
    from huggingface_hub.errors import HfUriError

    try:
        api.create_repo(repo, exist_ok=True, **options)
    except HfUriError:
        pass


def _unreachable(ctx: HubContext, exc: Exception) -> HubError:
    return HubError(f"cannot reach {ctx.endpoint} ({type(exc).__name__})",
                    hint="Check HF_ENDPOINT and the network, or set HF_HUB_OFFLINE=1 "
                         "to use the local cache.")


def download(ctx: HubContext, repo: str, revision: str | None,
             repo_type: str = "model") -> tuple[Path, str]:
    """A snapshot of ``repo`` in the cache: ``(directory, commit)``.

    Online, the repo is looked up first, so a bad token or a missing repo is
    an error instead of a silent fall back to an old cached copy.
    """
    from huggingface_hub import snapshot_download

    with hub_errors(ctx, repo, revision):
        if not ctx.offline:  # raises for a bad token or a missing repo or revision
            ctx.api().repo_info(repo, revision=revision, repo_type=repo_type)
        # by name, not by commit: the cache then knows the name for offline use
        path = snapshot_download(repo, revision=revision, repo_type=repo_type,
                                 endpoint=ctx.endpoint, token=ctx.token or False,
                                 cache_dir=ctx.cache_dir, local_files_only=ctx.offline)
    return Path(path), Path(path).name  # snapshots are stored under their commit
