"""filterhost test suite."""
