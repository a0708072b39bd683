"""Test doubles zoo ships for its own tests and for users: a local Hub."""
