"""Conventional recommenders (CRMs): DIN, SIM, GRU4Rec and SASRec. Their last hidden layer feeds RecLoRA's gates."""

from reclora.crm.din import DIN
from reclora.crm.features import CrmInputs
from reclora.crm.sequential import GRU4Rec, SASRec
from reclora.crm.sim import SIM

KINDS = ("din", "sim", "gru4rec", "sasrec")


def history_slots(kind: str, k_long: int):
    """The history a CRM reads: SIM retrieves K_long from the whole history (None); the others take the last K_long."""
    return None if kind == "sim" else k_long


def build_crm(kind, inputs: CrmInputs, embed_dim=64, hidden=256, k_long=60, search="soft", dropout=0.1):
    """DIN, GRU4Rec or SASRec over the last K_long items (inputs.history_slots), or SIM retrieving K_long
    from the whole history."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    arguments = dict(inputs.model_arguments(), embed_dim=embed_dim, hidden=hidden, dropout=dropout)
    if kind == "sim":
        return SIM(**arguments, k_long=k_long, search=search)
    if kind == "sasrec":
        return SASRec(**arguments, max_length=k_long)
    return {"din": DIN, "gru4rec": GRU4Rec}[kind](**arguments)


__all__ = ["DIN", "SIM", "GRU4Rec", "SASRec", "CrmInputs", "KINDS", "build_crm", "history_slots"]
