"""The built-in modalities, one module each: 4M-7's rgb, depth, normal, semseg, clip, caption, det.

Each module declares ``MODALITY = ModalitySpec(...)`` (``core/modalities.py``) and, where the
modality needs settings of its own, their config class. Modules here stay light (no torch, no
labeler import): the registry imports them all, also in ``make card``; a labeler is named by its
import path and loaded only where labelling happens. See docs/adding-a-modality.md.
"""
