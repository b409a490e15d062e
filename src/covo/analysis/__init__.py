"""Analysis beside training: the score, study, outcome and report commands, intervals, plots."""
