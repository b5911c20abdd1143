"""reclora: the RecLoRA model layer and trainer built on reclora_kernels (data, CRM, adapters, trainer).

It imports reclora_kernels, never the reverse. `from reclora import Recommender` loads a trained
run for inference (reclora.inference).
"""


def __getattr__(name):
    # Imported on first use: `import reclora.data` must not pay for torch and transformers.
    if name == "Recommender":
        from reclora.inference import Recommender

        return Recommender
    raise AttributeError(f"module 'reclora' has no attribute {name!r}")
