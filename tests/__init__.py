"""credgate test suite."""
