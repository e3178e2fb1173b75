"""Lifelong editors: closed-form updates meant to be made batch after batch for
thousands of edits, each batch continuing a running state (UltraEdit)."""
