"""The frozen CRM fused into the LLM's readout: P(Yes) = sigmoid(w m + (1 - w) c).

m is the LLM's Yes/No margin, c the CRM's logit, w in [0, 1] chosen on the validation split after
the LLM has trained on its own margin (`--crm-fusion`). Training the LLM apart from the CRM and
weighing the two on validation is what put a tuned LLM above its CRM on ML-100K (docs/RESULTS.md,
issue 16 parts 5 and 7); the CRM inside the loss (`--crm-residual`) or inside the gates made the LLM
relay the CRM instead.
"""

import numpy as np

from reclora.metrics import auc

# The weights tried on validation: 0 (the CRM alone) to 1 (the LLM alone) in steps of 0.05.
WEIGHT_GRID = tuple(float(w) for w in np.round(np.linspace(0, 1, 21), 2))


def fused_logit(llm_logit, crm_logit, weight: float):
    """w m + (1 - w) c, for numpy arrays or tensors alike."""
    return weight * llm_logit + (1 - weight) * crm_logit


def choose_weight(labels, llm_logit, crm_logit, grid=WEIGHT_GRID) -> dict:
    """The grid's weight whose fusion has the best AUC on these (validation) samples; ties go to the
    smaller weight, the one closer to the CRM alone. {weight, auc, grid, grid_auc}."""
    llm_logit, crm_logit = np.asarray(llm_logit, np.float64), np.asarray(crm_logit, np.float64)
    if llm_logit.shape != crm_logit.shape or llm_logit.shape != np.shape(labels):
        raise ValueError(
            f"labels, llm_logit and crm_logit must have one shape, got {np.shape(labels)}, "
            f"{llm_logit.shape} and {crm_logit.shape}"
        )
    scores = [auc(labels, fused_logit(llm_logit, crm_logit, w)) for w in grid]
    best = max(range(len(grid)), key=lambda i: (scores[i], -grid[i]))
    return {"weight": float(grid[best]), "auc": scores[best], "grid": list(grid), "grid_auc": scores}
