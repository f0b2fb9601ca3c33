"""GSM8K RL harness: a small Qwen3 policy trained with REINFORCE, GRPO and the PROMA variants.

``proma.rl.run(TrainConfig(...))`` trains one run and returns its directory (``from proma.rl.config import
TrainConfig``); command line ``proma train --task gsm8k-calc --method proma --steps N --out runs/NAME``. The
methods use PROMA only through the public ``proma.ProjectedAccumulator`` API. Modules: config, data (GSM8K, tasks,
rewards), tokenizer, policy (model + supervised warm-start), setup (what a run is built from), rollout
(generation, batches), sampling (step-seeded rollouts, minibatches, sequence log-probs), losses, metrics, update
(the micro-step loop and step diagnostics), rundir (logs and checkpoints), evaluation (greedy validation),
train (the loop), distributed, summary, cli.
"""


def run(cfg, *, log=print):
    """Train ``cfg`` (a ``TrainConfig``) and return its run directory: the harness's entry point for other code."""
    from .train import train

    return train(cfg, log=log)
