"""Local stand-ins for the services around the sidecar (snapshot storage, Realtime), with faults."""
