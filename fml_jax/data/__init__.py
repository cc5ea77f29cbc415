"""Datasets: generation (synthetic), reading (tfds), partitioning, device layout."""

from fml_jax.data.federated import FederatedData, from_client_lists, load_federated_data

__all__ = ["FederatedData", "from_client_lists", "load_federated_data"]
