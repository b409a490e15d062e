"""Evaluate a policy: `python eval.py benchmark=[gsm8k,math500] max_samples=20` (the same as
`covo eval benchmark=[gsm8k,math500] max_samples=20`)."""

from covo.launch.eval import main

if __name__ == "__main__":
    main()
