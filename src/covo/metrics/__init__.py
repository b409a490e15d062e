"""Per-step metrics and the reward diagnostics they log (answers, states, distances)."""
