"""CoVo (consistency and volatility of intermediate states): the reward, its statistics,
cluster selection, state segmentation and the prefix-shared scorer."""

from covo.rewards.covo.reward import CoVoReward

__all__ = ["CoVoReward"]
