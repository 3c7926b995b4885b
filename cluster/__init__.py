"""Kubernetes manifests; installed as the package `reformatters.cluster_manifests`."""
