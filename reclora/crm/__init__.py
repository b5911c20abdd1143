"""Conventional recommenders (CRMs): DIN and SIM. Their last hidden layer feeds RecLoRA's gates."""
from reclora.crm.din import DIN
from reclora.crm.features import CrmInputs
from reclora.crm.sim import SIM

KINDS = ("din", "sim")


def build_crm(kind, inputs: CrmInputs, embed_dim=64, hidden=256, k_long=60, search="soft", dropout=0.1):
    """DIN over the last K_long items (inputs.history_slots), or SIM retrieving K_long from the whole history."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    arguments = dict(inputs.model_arguments(), embed_dim=embed_dim, hidden=hidden, dropout=dropout)
    if kind == "din":
        return DIN(**arguments)
    return SIM(**arguments, k_long=k_long, search=search)


__all__ = ["DIN", "SIM", "CrmInputs", "build_crm"]
