"""hw3lib."""
