"""Covo rewards inside other trainers (TRL's GRPOTrainer: `covo.integrations.trl`)."""
