"""The orchestrator's commands, run outside the container with the service-role credentials the
container never holds: `sidecar token mint`, `sidecar snapshot publish`, `sidecar snapshot worker`.
"""
