"""Local folders and any other fsspec protocol, as a built-in protocol plugin.

``local``: a folder path or ``file://`` URL; ``any_fsspec``: any protocol fsspec knows, its
options given to fsspec unchanged; ``transfer``: a temporary name, then a rename, for every
sink no other transfer plugin takes; ``plugin``: the hooks.
"""
