"""Running training: `train(cfg)`, settings, errors, hardware, strategies, ranks, resume."""
