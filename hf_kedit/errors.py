"""The typed errors hf_kedit raises. Each message says what is wrong and how to fix it."""


class KeditError(Exception):
    """Base class of every hf_kedit error."""


class PackFormatError(KeditError, ValueError):
    """A pack's files are malformed: bad JSON, unknown version or kind, a tensor
    missing, extra, of the wrong shape or dtype, or not finite."""


class IncompatiblePackError(KeditError, ValueError):
    """A well-formed pack that does not fit this model: other architecture,
    other shapes, or other weights (fingerprint)."""


class EditConflictError(KeditError, ValueError):
    """Two attached edits share subject and prompt but disagree on the target."""


class AnatomyError(KeditError, ValueError):
    """hf_kedit could not find a part (layers, MLP output projection, final norm,
    LM head) of a model; the message names what it looked for."""


class EditRequestError(KeditError, ValueError):
    """Edit requests or a method's settings that the method cannot carry out: an
    empty field, a prompt without its "{}" subject slot, a layer out of range, a
    fact base that is malformed or (with strict=True) holds no usable fact. Raised
    before any statistics, templates or optimisation."""


class StatsError(KeditError, ValueError):
    """Shared key statistics (a folder or Hub repo written by `stats.push_stats`)
    that are malformed or do not fit this model or the statistics asked for."""


class MissingDependencyError(KeditError, ImportError):
    """A pack needs a package that is not installed (a steering router's
    sentence-embedding model); the message says what to `pip install`."""


class EditorError(KeditError, ValueError):
    """A trained editor (MEND's editor network, written by `train_mend`) that is
    missing, malformed, or was trained on another model's weights."""
