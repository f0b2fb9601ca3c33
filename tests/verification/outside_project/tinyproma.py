"""A tiny outside PROMA (NumPy): plain accumulation and exact layer-wise projection, linear weights only."""
import numpy as np


def accumulate(case, *, sign=1.0):
    """outputs[m][k] for variant "none" or exact "proma" without bound/shrinkage; None for other layers."""
    outputs, G = [], {}
    for m in range(case.n_microbatches):
        row = []
        for k, layer in enumerate(case.layers):
            if layer.uses != ("linear",):
                row.append(None)
                continue
            use, b = case.use(m, k, 0), case.batch_size(m)
            g = np.zeros((b, *layer.shape))
            np.add.at(g, use["seq"], np.einsum("to,ti->toi", use["D"], use["X"]))
            pg = np.tensordot(case.weights(m), g, axes=1)
            Gk = G.get(k, np.zeros(layer.shape))
            if case.settings.variant == "proma":
                rows = g.reshape(b, -1)
                _, s, vt = np.linalg.svd(rows, full_matrices=False)
                q = vt[s > max(rows.shape) * np.finfo(float).eps * s[0]] if s.size and s[0] > 0 else vt[:0]
                Gk = Gk - (q.T @ (q @ Gk.ravel())).reshape(layer.shape)
            G[k] = Gk + sign * pg
            row.append(G[k])
        outputs.append(row)
    return outputs


def supports(settings):
    return settings.variant == "none" or (settings.variant == "proma" and settings.solver == "exact"
                                          and settings.relative_bound is None and settings.shrinkage == 1.0)
