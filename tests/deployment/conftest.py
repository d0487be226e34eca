"""The deployment's tests: Dockerfiles, compose, Kubernetes manifests, the router, the images
(podman).

Helpers: tests/support/deploy_helpers.py."""
