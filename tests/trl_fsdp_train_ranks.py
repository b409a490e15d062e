"""Run by test_trl_sharded under `torch.distributed.run --nproc_per_node=2` (gloo, CPU): one
GRPOTrainer step (`train()`) with the covo reward under accelerate's FSDP2 plugin
(`fsdp=True`, `fsdp_config={"version": 2}`), so accelerate's `fsdp2_prepare_model` shards the
tiny model (each decoder layer, the embedding and output head, the root) before TRL generates.

Accelerate never takes its FSDP path on a CPU: `AcceleratorState` sets `MULTI_CPU` and reads
the FSDP plugin only for accelerator devices. `fsdp_on_cpu` makes that one decision as on a
GPU (the FSDP distributed type with the trainer's own plugin); everything after it is
accelerate's, transformers' and TRL's own code. The processes decode and score different
amounts: both sample `\\boxed{1}` or `\\boxed{7}` (`boxed_bias`), rank 0 for all 16 tokens,
rank 1 then its end of sequence, so its rows all end after a few tokens while rank 0 decodes
on (generate keeps them in step), and CoVo's scorer reads other trajectories on each. Writes
rank<r>.json: per reward call the prompt and completion ids, the rewards returned and the
values logged, the forwards run, and the local and full sizes of the parameters."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from test_trl_capture import boxed_bias
from test_trl_integration import CovoReward, build_tiny, trainer_with
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from covo.rewards.covo.reward import encode

torch.set_num_threads(1)
BUDGET = 20  # tokens a statistics forward: rank 0's rows one a forward, rank 1's two


def fsdp_on_cpu() -> None:
    """Accelerate's FSDP distributed type for a CPU run given an FSDP plugin (as on a GPU)."""
    build = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        build(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def ends_early(tokenizer) -> dict:
    """`sequence_bias` that makes the random tiny model write `\\boxed{1}` or `\\boxed{7}` at
    once, then its end of sequence (6 tokens)."""
    backslash, boxed, brace, _, close = encode(tokenizer, "\\boxed{7}")
    digits = [encode(tokenizer, d)[0] for d in ("1", "7")]
    bias = {(backslash,): 12.0, (backslash, boxed): 60.0, (boxed, brace): 60.0}
    bias |= {(brace, d): 40.0 for d in digits} | {(d, close): 60.0 for d in digits}
    return bias | {(close, tokenizer.eos_token_id): 80.0}


def sizes(model: torch.nn.Module) -> dict:
    """The parameters' elements held by this process, and their full number."""
    params = list(model.parameters())
    return {
        "dtensor": all(isinstance(p, DTensor) for p in params),
        "local": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "full": sum(p.numel() for p in params),
    }


class Recorded:
    """Stands in TRL's reward list for `reward`: before each call writes the full weights the
    reward scores with (weights<call>.pt, a collective every process runs at the same point),
    then records the call's rows, rewards, logged values, the forwards of the policy's body
    during the call, and the parameters' sizes before and after it. In the first call it drops
    what the capture kept, so the statistics come from the batched forwards (as under vLLM),
    at most `stats_token_budget` tokens each; the second reads them from generate."""

    def __init__(self, reward: CovoReward, model: torch.nn.Module, out: Path):
        self.reward, self.model, self.out, self.calls = reward, model, out, []
        self.__name__ = reward.__name__
        self.forwards, self.counting = 0, False
        model.model.register_forward_pre_hook(self.count)

    def count(self, module, args) -> None:
        self.forwards += self.counting

    def __call__(self, prompts, completions, completion_ids, log_metric=None, **columns):
        trainer = self.reward.trainer
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=options)
        if trainer.accelerator.is_main_process:
            torch.save(weights, self.out / f"weights{len(self.calls)}.pt")
        if not self.calls:
            self.reward.capture.generated = None
        before, logged = sizes(self.model), {}
        self.forwards, self.counting = 0, True
        rewards = self.reward(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            log_metric=lambda key, value: (logged.__setitem__(key, value), log_metric(key, value)),
            **columns,
        )
        self.counting = False
        self.calls.append(
            {
                "prompt_ids": [list(ids) for ids in trainer._tokenize_prompts(prompts)[0]],
                "completion_ids": [list(ids) for ids in completion_ids],
                "rewards": rewards,
                "logged": logged,
                "forwards": self.forwards,
                "before": before,
                "after": sizes(self.model),
            }
        )
        return rewards


def main(out: Path) -> None:
    fsdp_on_cpu()
    rank = int(os.environ["RANK"])
    loaded = build_tiny()
    reward = CovoReward("covo", [f"stats_token_budget={BUDGET}"])
    bias = boxed_bias(loaded.tokenizer) if rank == 0 else ends_early(loaded.tokenizer)
    trainer = trainer_with(
        reward,
        out / "run",
        loaded,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        fsdp=True,
        fsdp_config={"version": 2},
        generation_kwargs={"sequence_bias": bias},
    )
    assert trainer.accelerator.process_index == rank
    model = trainer.accelerator.unwrap_model(trainer.model)
    recorded = trainer.reward_funcs[0] = Recorded(reward, model, out)
    trainer.train()
    record = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version,
        "calls": recorded.calls,
        "log_history": trainer.state.log_history,
        "step": trainer.state.global_step,
        "temperature": trainer.temperature,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
