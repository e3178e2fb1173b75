"""Memory editors: each edit kept beside the model as an entry that inference
looks up, so that edits accumulate without writing any weight (GRACE)."""
