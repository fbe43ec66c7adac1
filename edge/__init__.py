"""exar.edge: The validate-then-exclusively-reanswer loop on CPU through llama.cpp."""
