"""Local changes out: the watcher, the push through the database RPCs, conflicts and merges."""
