"""The layer atlas: every unit of a layer on one offline, browsable site (``atlas.py``)."""
