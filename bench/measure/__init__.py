"""What a run measures: ``timing`` (busy time per phase, the modelled K-worker time),
``memory`` (per stage and device), ``profile`` (FLOPs, bytes, tensors saved for backward),
``submodels`` (sub-model costs, progressive inference, ensembles), ``provenance``."""
