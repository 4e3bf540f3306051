"""optax_memopt: memory-efficient full-parameter optimizers for JAX/Optax."""

__version__ = "0.1.0"
