"""GSM8K RL harness: a small Qwen3 policy trained with REINFORCE, GRPO and the PROMA variants.

``proma.rl.run(TrainConfig(...))`` trains one run and returns its directory (``from proma.rl.config import
TrainConfig``); command line ``proma train --task gsm8k-calc --method proma --steps N --out runs/NAME``. The
methods use PROMA only through the public ``proma.ProjectedAccumulator`` API. Modules: config, data (GSM8K, tasks,
rewards), tokenizer, policy (model + supervised warm-start), build (what a run is built from), generation
(sampling completions, sequence batches), rollout (a training step's step-seeded rollout), batching
(minibatches, microbatches, their weights, a real microbatch), losses (log-probs, advantages, weights, GRPO's
surrogate), metrics (KL, entropy), diagnostics (what a step records besides the loss), rundir (logs and
checkpoints), evaluation (greedy validation), train (the loop and its micro-step loop), distributed, summary,
cli.
"""


def run(cfg, *, log=print):
    """Train ``cfg`` (a ``TrainConfig``) and return its run directory: the harness's entry point for other code."""
    from .rundir import owned_while_running
    from .train import train

    with owned_while_running(cfg.out):   # the run directory's lock is released when the run ends
        return train(cfg, log=log)
