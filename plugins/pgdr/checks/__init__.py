"""Proving a restored database good: exact integrity checks and Great Expectations validation."""
