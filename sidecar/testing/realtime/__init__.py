"""A protocol-faithful Supabase Realtime server for tests: wire format, tokens, sockets, server."""
