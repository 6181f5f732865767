"""Plumbing: the synthetic phantom chest X-ray world and the pretraining of its tiny base LDM."""
