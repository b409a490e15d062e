"""Foundations: errors, hardware, strategies, ranks, resume, settings-rule helpers, conf/."""
