"""Running registered models without a server: greedy generation through transformers."""
