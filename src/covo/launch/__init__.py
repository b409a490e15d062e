"""Where a run is put together: `train(cfg)` and the checks across config groups."""
