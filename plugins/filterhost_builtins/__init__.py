"""filterhost's built-in plugins.

Each module here is an ordinary plugin, registered in the ``filterhost.plugins`` entry-point
group and written against the public API (``from filterhost import ...``) only, so a third-party
author can copy one as a template. The package is named ``filterhost_builtins`` (not ``plugins``)
so that installing filterhost never adds a top-level module with a generic name.
"""
