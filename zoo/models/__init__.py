"""What files on disk are: adapters (PEFT, bottleneck), base models, training data, the
embedded GGUF base, NF4 checkpoints. Reads files; knows nothing of a registry."""
