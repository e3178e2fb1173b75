"""Context distillation: a pack trained so that the model without a fact in its
context answers as it does with the fact there (`distill`)."""
