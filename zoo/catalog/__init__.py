"""The registry and its invariants: names and the home layout, registry.json, the one
transaction every write ends in, the integrity resolver, the shipped catalog, and loading
registered entries into transformers."""
