"""The package's version, in a module of its own so that the parts that record it
(pack manifests, shared statistics) need not import the package's face."""
__version__ = "0.1.0"
