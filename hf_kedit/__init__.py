"""hf_kedit: knowledge edits of language models as shareable, removable adapter packs.

Example:
    >>> from hf_kedit import load_edits, remove_edits
    >>> model = load_edits(base, "user/edits")
    >>> remove_edits(model, "user/edits")
"""
from .version import __version__

from .errors import (AnatomyError, EditConflictError, EditRequestError, IncompatiblePackError, KeditError,
                     MissingDependencyError, PackFormatError, StatsError)
from .pack import Edit, EditPack
from .attach import EditStack, load_edits, remove_edits, stack_of
from .anatomy import Anatomy, anatomy_of

__all__ = ["Anatomy", "AnatomyError", "Edit", "EditConflictError", "EditPack", "EditRequestError", "EditStack",
           "IncompatiblePackError", "KeditError", "MissingDependencyError", "PackFormatError", "StatsError",
           "__version__", "anatomy_of", "load_edits", "remove_edits", "stack_of"]
