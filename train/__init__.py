"""exar.train: QLoRA training of the three EXAR adapters and the DATASET+ step."""
