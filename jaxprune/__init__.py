"""jaxprune: structured filter pruning for Flax CNNs."""
