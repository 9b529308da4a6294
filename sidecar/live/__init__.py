"""Remote changes in: the supervised Realtime subscription, event parsing, ordering and applying.

The delta rules, the same for live, replayed and buffered events. Code and tests cite them as
"delta rule N"; the README's "Live deltas" section has the same list.

0. Only the database changes files. Events written by the database with `realtime.send` carry
   `meta.id` (the `realtime.messages` row id); Realtime passes a client's broadcast payload
   through unchanged, `meta` included, so the boundary is who may write on the channel: no
   container token may. `file:*`, `bulk:apply` and `snapshot:ready` without `meta.id` are refused
   and counted, unless `SIDECAR_ACCEPT_CLIENT_EVENTS=true`.
1. A change to a path is applied only if its `version` is greater than the version known for
   that path (from the manifest or an earlier delta, deletes included: a delete leaves a
   tombstone, so a late update cannot resurrect the file). Anything else is a duplicate or
   stale, counted, never written.
2. `content_hash` is checked against the bytes before the disk is touched. A mismatch is
   rejected, counted, and leads to a resync.
3. If the file already holds those bytes, the version is recorded and nothing is written.
4. The sidecar starts subscribing before it downloads the snapshot, buffers what arrives, and
   applies the buffer after hydration (rule 1 drops what the snapshot already had). The join
   asks for broadcast replay from a margin (10 s) before the snapshot's `created_at` (replay
   compares a row's transaction start), so no edit made between snapshot creation and
   subscription is lost, whether the join comes before hydration ends or after (the child
   does not wait for it).
5. `seq`, where the producer sends it, is gap-free per project. A jump means events were missed:
   the sidecar rejoins with replay since its last applied event; if replay (at most 25
   messages) cannot fill the gap, it reads the missing events from the database's event log
   (`rpc/project_events_since`, paged, with its own token; needs `SUPABASE_URL`), which also
   has the events `realtime.send` failed to store; only if that fails too does it ask for a
   fresh snapshot (`snapshot:request`) and re-converge on the `snapshot:ready` answer.
6. Bulk changes are staged whole and then published; a bulk that fails a check changes nothing.
7. Rule 1 holds for snapshots too: publishing a snapshot never takes a path back to an older
   version than the one already applied, and never resurrects a path whose tombstone is newer.
   Events newer than the snapshot's `seq` stay applied.
"""
