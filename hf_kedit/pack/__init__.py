"""The pack: its format (`format`), what it records of its base model
(`fingerprint`), its model card (`card`) and where it lives (`hub`: a folder or
a Hub repo). Nothing here acts on a model at inference; that is the kinds'.

Example:
    >>> from hf_kedit.pack import EditPack
    >>> pack = EditPack.from_pretrained("user/edits")
"""
from .format import (CARD_NAME, CONFIG_NAME, EDIT_ID, FORMAT_VERSION, PACK_FILES, WEIGHTS_NAME, Edit, EditPack,
                     check_edits, read_pack)

__all__ = ["CARD_NAME", "CONFIG_NAME", "EDIT_ID", "FORMAT_VERSION", "PACK_FILES", "WEIGHTS_NAME", "Edit", "EditPack",
           "check_edits", "read_pack"]
