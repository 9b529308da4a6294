"""Remote changes in: the supervised Realtime subscription, event parsing, ordering and applying."""
