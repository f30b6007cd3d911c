"""Models built from the library's layers."""
