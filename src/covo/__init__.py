"""Self-rewarding RL for LLM reasoning: CoVo and its baselines."""
