"""Training: the loop (setup, train, finish), one optimiser step, the online probe, metrics, seeds, signals."""
