"""Flax Linen layers of the ling-jax transformer."""
