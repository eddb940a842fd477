"""Validation of the deploy/ artifacts: the container image, the compose deployment and the Kubernetes manifests."""
