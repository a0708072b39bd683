"""zoo: an adapter model zoo."""
__version__ = "0.1.0"
