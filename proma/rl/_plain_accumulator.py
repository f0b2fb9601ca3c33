"""TEMPORARY development stand-in for proma.ProjectedAccumulator (variant "none" only). Delete when it lands."""
import torch


class PlainAccumulator:
    def __init__(self, model, variant="none", **kwargs):
        if variant != "none":
            raise ImportError(f"proma.ProjectedAccumulator is not available yet (variant={variant!r})")
        self.model = model

    def zero_grad(self):
        for p in self.model.parameters():
            p.grad = None

    def backward(self, seq_logp, weights):
        (weights * seq_logp).sum().backward()

    def stats(self):
        return {"summary": {}}

    def close(self):
        pass
