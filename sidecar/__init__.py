"""sidecar: makes a preview container's project directory a live, verified copy of the project."""

__version__ = "0.1.0"
