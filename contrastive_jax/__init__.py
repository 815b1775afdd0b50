"""contrastive_jax: contrastive pretraining in JAX/Flax."""
