"""exar.eval: Quantized vs full precision on the held-out questions."""
