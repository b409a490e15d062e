"""Studies over many runs or samples: which reward recognises the truth, which one trains best."""
