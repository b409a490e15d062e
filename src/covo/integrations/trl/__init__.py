"""covo inside TRL's GRPOTrainer (the `trl` extra): any covo reward as a reward function
(`reward`), and covo's collapse guard as a trainer callback (`guard`).

    reward = CovoReward("covo")                  # conf/reward/covo.yaml, or a YAML file's path
    trainer = grpo_trainer(reward, model=model, processing_class=tokenizer, args=config,
                           train_dataset=dataset)  # GRPOTrainer(reward_funcs=[reward]) + bind

`bind` (which `grpo_trainer` calls) also puts the guard, built from `callbacks.collapse_guard`
of conf/integrations/trl.yaml, among the trainer's callbacks; `callbacks.collapse_guard=null`
leaves it out. What `bind` refuses and warns of: `checks`; the reward under sharded parameters:
`sharding`; the statistics kept from TRL's own generate: `capture`.
"""

from covo.integrations.trl.checks import GROUP_KEYS, check_whole_groups
from covo.integrations.trl.guard import CollapseGuardCallback
from covo.integrations.trl.reward import MISSING, CovoReward, grpo_trainer, integration_config

__all__ = [
    "GROUP_KEYS",
    "MISSING",
    "CollapseGuardCallback",
    "CovoReward",
    "check_whole_groups",
    "grpo_trainer",
    "integration_config",
]
