"""``zoo push`` / ``zoo pull ORG/NAME`` / ``zoo sync``: the Hub as the zoo's shared store.

One module each (``push``, ``pull``, ``sync``) on ``client`` (the connection and its
errors) and ``cards`` (the model card and the ``zoo.json`` manifest).

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
