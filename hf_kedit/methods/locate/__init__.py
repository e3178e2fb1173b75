"""Locate-and-edit (ROME, MEMIT, STEAM): a rank-one or least-squares change of one
MLP output projection per layer, from the key at the subject's last token and
an optimised value. `core` holds what they share (keys, context templates, the
value optimisation), `stats` the key statistics, `head_loss` the value loss
through the LM head."""
