"""zoo's web pages: the catalog, each entry, usage and a playground (web.py serves them)."""
