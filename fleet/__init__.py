"""The local fleet harness: real Redis, N searchrec replicas and nginx on loopback, started and stopped
by the project itself (tests, `bench/fleet.py`, `python -m fleet up`). Nothing here is used in production:
there Kubernetes (deploy/k8s) or a process supervisor runs the same parts."""
