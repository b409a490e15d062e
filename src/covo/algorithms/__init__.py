"""Advantage estimators, policy losses and the plan of each update (epochs, micro-batches)."""
