"""Plumbing of the model: weight files read safely, renaming rules of every checkpoint family, the converted-folder
format."""
