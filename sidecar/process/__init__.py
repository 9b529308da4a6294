"""The entrypoint's process duties: the child (the dev server), PID-1 reaping, hooks."""
