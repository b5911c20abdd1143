"""Conventional recommenders (CRMs): DIN and SIM. Their last hidden layer feeds RecLoRA's gates."""
from reclora.crm.din import DIN
from reclora.crm.sim import SIM

__all__ = ["DIN", "SIM"]
