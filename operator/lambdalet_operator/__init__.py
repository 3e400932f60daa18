"""The lambdalet operator (kopf): reconciles Function resources into Kubernetes workloads."""
