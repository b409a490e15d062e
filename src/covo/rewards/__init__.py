"""Rewards: each maps one prompt's group of responses to a `GroupReward` (see `base`);
`scoring` runs a rollout's groups through one."""
