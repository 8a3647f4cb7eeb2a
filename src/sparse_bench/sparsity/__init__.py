"""Masks, initial density distributions, and the sparsity methods."""
