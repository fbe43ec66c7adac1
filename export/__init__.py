"""exar.export: Merge, convert to GGUF, quantize and verify a run's adapters."""
