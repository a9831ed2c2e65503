"""Deployment with Flower's own engine (`secure-kd deploy`, docs/deploy.md): files, registry, launchers."""
