"""Representation methods (ReFT, BaFT): interventions on a decoder layer's
hidden states, trained on the edit. `core` holds the training loop and the
intervention module both use."""
