-- OPTIONAL, off by default (`sidecar db sql --allow-client-broadcast` appends it): lets a token
-- whose `editor` claim is true broadcast on its project's channel, for a legacy editor that
-- still sends file:* events from the browser. Realtime passes such a payload through unchanged,
-- so anyone holding that token can make every container of the project write what they like.
-- Containers must keep tokens without the claim; sidecars apply file:* events without meta.id
-- (client broadcasts) only when their operator opts in as well (see the README).
-- Realtime checks write permission per channel, never per event.

drop policy if exists "sidecar: editor token broadcasts on its channel" on realtime.messages;
create policy "sidecar: editor token broadcasts on its channel" on realtime.messages
  for insert to authenticated
  with check (realtime.messages.extension = 'broadcast'
              and realtime.messages.topic = (select realtime.topic())
              and realtime.messages.topic = 'project:' || lower((select auth.jwt()) ->> 'project_id')
              and coalesce((select auth.jwt()) -> 'editor', 'false'::jsonb) = 'true'::jsonb
              and coalesce((select auth.jwt()) -> 'read_only', 'false'::jsonb)
                  in ('false'::jsonb, 'null'::jsonb));
