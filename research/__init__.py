"""memlab's research core: model assembly, data, training loop, checkpointing, metrics and memory accounting."""
