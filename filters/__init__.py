"""Curation filters, one module each: its declaration (``FILTER``, a ``core.curation.FilterSpec``)
beside its scorer. Importing a module here stays light (the registry reads every declaration);
heavy libraries are imported where a scorer runs."""
