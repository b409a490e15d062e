"""Train a policy with a self-reward: `python train.py reward=covo algorithm=grpo` (the same as
`covo train reward=covo algorithm=grpo`)."""

from covo.launch.train import main

if __name__ == "__main__":
    main()
