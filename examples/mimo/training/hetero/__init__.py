"""Heterogeneous-parallel MIMO training: encoder and LLM on disjoint rank grids."""
