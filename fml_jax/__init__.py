"""fml_jax: a JAX/Flax simulator for heterogeneous federated learning.

Start at `fml_jax.train.run` (one experiment) or `fml_jax.main` (the command
line); WORKSPACE.md maps the rest.
"""

__version__ = "0.1.0"
