"""Lightning callbacks and what they watch: collapse detector and guard, progress, checkpoints."""
