"""The command-line interface: one small module per command; the library does the work."""
