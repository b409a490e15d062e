"""Analysis beside training: the score, study and report commands, intervals and plots."""
