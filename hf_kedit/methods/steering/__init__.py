"""Steering methods (SAKE, ActAdd): per-edit affine maps of the last hidden
state with a scope router. `core` holds the states, scopes and pack building
both use; `transport` the factored optimal-transport map; `scope` threshold
calibration."""
