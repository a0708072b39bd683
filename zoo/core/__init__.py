"""The vocabulary every layer shares: typed records, file facts (hashes, safetensors
headers), shared tables and memory measurement. Imports nothing of zoo but errors."""
