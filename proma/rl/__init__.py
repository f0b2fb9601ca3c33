"""GSM8K RL harness: a small Qwen3 policy trained with REINFORCE, GRPO and the PROMA variants.

``from proma.rl.config import TrainConfig`` and ``from proma.rl.train import train``; command line
``proma train --task gsm8k-calc --method proma --steps N --out runs/NAME``. The methods use PROMA only through
the public ``proma.ProjectedAccumulator`` API. Modules: data (GSM8K, tasks, rewards), tokenizer, policy
(model + supervised warm-start), rollout, losses, metrics, config, train, summary, cli.
"""
