"""``zoo push`` / ``zoo pull ORG/NAME`` / ``zoo sync``: the Hub as the zoo's shared store.

``huggingface_hub`` does the talking; zoo adds what a catalog needs on top:
a ``zoo.json`` manifest beside each adapter (its registry entry and the hash
of every file), hash checks before anything is registered, and a catalog
index (a ``registry.json`` in a dataset repo) that several machines merge
into by name and content hash.

Settings are read when a call is made, not at import: ``HF_ENDPOINT`` (another
Hub: self-hosted, a mirror, the test double), ``HF_TOKEN`` (or ``--token``),
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` / ``HF_HOME``. The token is never written
to the registry, a log line or an error message.
"""

from zoo.hub.client import HubContext
from zoo.hub.pull import pull_from_hub
from zoo.hub.push import PushResult, push
from zoo.hub.sync import SyncResult, sync

__all__ = ["HubContext", "PushResult", "SyncResult", "pull_from_hub", "push", "sync"]
