"""Learned editors: a network trained once per base model on a training set of
edits maps each new edit's gradient to a weight update, with no optimisation per
edit (MEND)."""
