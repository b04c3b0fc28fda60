"""The code of docs/plugins.md: every Python and TOML block in the guide is a snippet from here.

Snippets sit between ``# -- start NAME --`` and ``# -- end NAME --`` lines (whole files for
TOML); the guide says ``<!-- include: PATH#NAME -->`` above each block, and
tests/test_hookspecs_documented.py checks that the blocks are exactly these snippets. After
editing a snippet, run ``python -m tests.docs_examples.snippets`` to copy it into the guide.
"""
