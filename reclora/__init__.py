"""reclora: the RecLoRA model layer and trainer built on reclora_kernels (data, CRM, adapters, trainer).

It imports reclora_kernels, never the reverse.
"""
