"""A local Kubernetes 1.20 control plane with a process node: for e2e tests, the demo, and trying modelops."""
