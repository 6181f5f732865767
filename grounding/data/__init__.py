"""Plumbing of the method: dataset readers, report parsing and the weak supervision built from them."""
