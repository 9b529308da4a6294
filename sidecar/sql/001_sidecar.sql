-- sidecar: the database side of the preview-container sidecar (issue 13).
--
-- Runs unchanged on a Supabase project (as `postgres`, e.g. `sidecar db sql >
-- supabase/migrations/<ts>_sidecar.sql`) and on the test shim in sidecar/testing/sql/. It is
-- idempotent: applying it again replaces the functions and policies and keeps the data.
--
-- What it provides (the README section "The database side" describes it too):
--
-- * public.project_files: one row per version of a path. `content` is the file's text for
--   text files and the canonical base64 (no line breaks) of its bytes when file_type =
--   'binary'; `content_hash` is the sha256 hex of the bytes; a delete is a tombstone version
--   (deleted = true, content null). public.project_files_current: the live head of every path.
-- * sidecar.projects (the per-project seq counter), sidecar.events (the event log that
--   project_events_since reads: every broadcast with a seq, kept until sidecar.prune_events),
--   sidecar.snapshot_requests (the queue the snapshot worker drains). The `sidecar` schema is
--   not exposed through PostgREST and no API role has any right on it.
-- * RPCs (security definer, search_path '', time zone UTC, PostgREST named arguments):
--   upsert_project_file, delete_project_file, bulk_upsert_project_files, get_project_file,
--   list_current_files, project_snapshot, project_events_since, register_project,
--   report_local_change, request_snapshot.
-- * RLS on project_files and the realtime.messages policies for the private topic
--   'project:<uuid>': a token whose `project_id` claim names the project reads its channel and
--   never writes to it (every event on it is written by these functions with realtime.send).
--
-- Authorization comes from the JWT claims (auth.jwt()): `role`, `project_id`, `read_only`,
-- `session_id`, `sub`. service_role may do everything; an `authenticated` token with a
-- `project_id` claim reads that project and writes it unless `read_only` is set; anything
-- else gets SQLSTATE 42501. A caller with no claims at all is a direct database connection
-- (a migration, the orchestrator with a database URL): trusted as service_role, except the
-- PostgREST login role `authenticator`, which always sets claims, so it is treated as anon.
--
-- seq: gap-free per project and in commit order. Every write locks its project's counter row
-- (sidecar.projects) first and increments it only when something changes; the lock is held to
-- commit, so the next writer numbers after this one commits, and a rolled-back call undoes its
-- increment. This needs READ COMMITTED (PostgREST's default); under REPEATABLE READ a second
-- concurrent writer fails with 40001. Lock order is always project row, then file rows.
--
-- Large content: an event carries the body inline (content / content_b64) only when the
-- body as it appears in the message's JSON (the escaped text, or the base64 characters) is at
-- most sidecar.inline_max() = 196608 bytes (192 KiB), which keeps a message under Supabase's
-- 256 KB free-plan limit and realtime-py's 1 MiB frame. Above it the entry has file_path, version, content_hash and size
-- but no content field; the subscriber fetches the bytes with get_project_file. In a
-- bulk:apply the budget is shared by all entries (in path order).

create schema if not exists sidecar;
revoke all on schema sidecar from public;

-- ---------------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------------

create table if not exists sidecar.projects (
  project_id uuid primary key,
  seq bigint not null default 0,
  created_at timestamptz not null default now()
);

create table if not exists sidecar.events (
  project_id uuid not null references sidecar.projects (project_id) on delete cascade,
  seq bigint not null,
  event text not null,
  payload jsonb not null,
  created_at timestamptz not null default clock_timestamp(),
  primary key (project_id, seq)
);

create table if not exists sidecar.snapshot_requests (
  id bigint generated always as identity primary key,
  project_id uuid not null references sidecar.projects (project_id) on delete cascade,
  session_id text,
  reason text,
  last_seq bigint,
  requested_at timestamptz not null default now(),
  claimed_by text,
  claimed_at timestamptz,
  done_at timestamptz,
  snapshot_id text,
  error text
);
create index if not exists snapshot_requests_open
  on sidecar.snapshot_requests (project_id, requested_at) where done_at is null;

create table if not exists public.project_files (
  id bigint generated always as identity primary key,
  project_id uuid not null references sidecar.projects (project_id) on delete cascade,
  file_path text not null,
  file_type text not null default 'text',
  content text,                        -- text, or base64 when file_type = 'binary'; null = tombstone
  content_hash text,                   -- sha256 hex of the bytes; null for a tombstone
  size bigint,                         -- bytes; null for a tombstone
  version bigint not null check (version > 0),
  deleted boolean not null default false,
  parent_version_id bigint references public.project_files (id),
  is_current_version boolean not null default true,
  created_by text,                     -- who created the path (first live version)
  last_modified_by text,               -- who wrote this version
  seq bigint not null,                 -- the event that made this version
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint project_files_path_version unique (project_id, file_path, version),
  constraint project_files_tombstone check (deleted = (content is null))
);
-- One current row per path; also the index every head lookup and listing uses.
create unique index if not exists project_files_current_path
  on public.project_files (project_id, file_path) where is_current_version;
-- Finds live files under a directory (the file-versus-directory check) with LIKE 'dir/%'.
create index if not exists project_files_live_prefix
  on public.project_files (project_id, file_path text_pattern_ops)
  where is_current_version and not deleted;

create or replace view public.project_files_current with (security_invoker = true) as
  select id, project_id, file_path, file_type, content, content_hash, size, version,
         parent_version_id, created_by, last_modified_by, seq, created_at, updated_at
    from public.project_files
   where is_current_version and not deleted;

alter table public.project_files enable row level security;
alter table sidecar.projects enable row level security;
alter table sidecar.events enable row level security;
alter table sidecar.snapshot_requests enable row level security;

-- Reads of the table itself (an editor listing files with supabase-js) follow the same rule as
-- the RPCs; writes go through the RPCs only, so no API role may write the table directly.
revoke all on public.project_files, public.project_files_current from anon, authenticated;
grant select on public.project_files, public.project_files_current to authenticated, service_role;
drop policy if exists "sidecar: project token reads its files" on public.project_files;
create policy "sidecar: project token reads its files" on public.project_files
  for select to authenticated
  using (project_id::text = lower((select auth.jwt()) ->> 'project_id'));

-- ---------------------------------------------------------------------------------------------
-- Internal helpers (schema sidecar; not callable by the API roles)
-- ---------------------------------------------------------------------------------------------

create or replace function sidecar.inline_max() returns int
language sql immutable set search_path = '' as $$ select 196608 $$;

-- What a body costs in the message: its JSON string (escapes count: a file of newlines
-- doubles), which is what Realtime measures against its payload limit.
create or replace function sidecar.inline_cost(p_content text) returns bigint
language sql immutable set search_path = '' as $$
  select octet_length(to_jsonb(p_content)::text)::bigint $$;

create or replace function sidecar.ms(t timestamptz) returns bigint
language sql immutable set search_path = '' as $$
  select (extract(epoch from t) * 1000)::bigint $$;

-- The caller's role: the `role` claim; no claims = a direct connection (see the header).
create or replace function sidecar.claim_role() returns text
language sql stable set search_path = '' as $$
  select coalesce(
    nullif((select auth.jwt()) ->> 'role', ''),
    case when session_user::text = 'authenticator' then 'anon' else 'service_role' end) $$;

-- Events' `sender`: the token's session_id, else its sub; null for the service role.
create or replace function sidecar.sender() returns text
language sql stable set search_path = '' as $$
  select case when sidecar.claim_role() = 'service_role' then null
              else coalesce(nullif((select auth.jwt()) ->> 'session_id', ''),
                            nullif((select auth.jwt()) ->> 'sub', '')) end $$;

-- Who wrote a row, for the audit columns (the role when there is no sender).
create or replace function sidecar.author() returns text
language sql stable set search_path = '' as $$
  select coalesce(sidecar.sender(), sidecar.claim_role()) $$;

-- Raises 42501 unless the caller may read (p_write = false) or write the project.
create or replace function sidecar.authorize(project_uuid uuid, p_write boolean) returns void
language plpgsql stable set search_path = '' as $$
declare
  v_role text := sidecar.claim_role();
  v_claims jsonb := coalesce(auth.jwt(), '{}'::jsonb);
begin
  if v_role = 'service_role' then
    return;
  end if;
  if v_role = 'authenticated' and project_uuid is not null
     and lower(v_claims ->> 'project_id') = project_uuid::text then
    -- Any read_only value but false/null counts as read-only: fail closed on odd claims.
    if p_write and coalesce(v_claims -> 'read_only', 'false'::jsonb)
                   not in ('false'::jsonb, 'null'::jsonb, '"false"'::jsonb) then
      raise sqlstate '42501' using message = 'read-only token: writes are refused';
    end if;
    return;
  end if;
  raise sqlstate '42501'
    using message = format('permission denied for project %s', project_uuid),
          hint = 'the token needs role authenticated and a project_id claim naming the project';
end $$;

-- A canonical project-relative path (what sidecar/tree/paths.py accepts), else 22023.
create or replace function sidecar.check_path(p text) returns text
language plpgsql immutable set search_path = '' as $$
declare
  v_part text;
begin
  if p is null or p = '' then
    raise sqlstate '22023' using message = 'file path is empty';
  end if;
  if octet_length(p) > 4096 then
    raise sqlstate '22023' using message = format('file path too long: %s…', left(p, 200));
  end if;
  if p like '/%' or p ~ '^[A-Za-z]:' or strpos(p, E'\\') > 0 then
    raise sqlstate '22023' using message = format('file path must be relative, without backslashes: %L', left(p, 200));
  end if;
  foreach v_part in array string_to_array(p, '/') loop
    if v_part in ('', '.', '..') then
      raise sqlstate '22023' using message = format('file path is not canonical: %L', left(p, 200));
    end if;
    if octet_length(v_part) > 255 then
      raise sqlstate '22023' using message = format('file path component too long: %L', left(p, 200));
    end if;
  end loop;
  if p = '.sidecar' or p like '.sidecar/%' then
    raise sqlstate '22023' using message = format('file path is reserved for the sidecar: %L', p);
  end if;
  return p;
end $$;

-- Locks the project's counter row until commit and returns its seq; PT404 if unknown.
create or replace function sidecar.lock_project(project_uuid uuid) returns bigint
language plpgsql set search_path = '' as $$
declare
  v_seq bigint;
begin
  select p.seq into v_seq from sidecar.projects p where p.project_id = project_uuid for update;
  if not found then
    raise sqlstate 'PT404'
      using message = format('project %s is not registered', project_uuid),
            hint = 'register it with register_project (service role)';
  end if;
  return v_seq;
end $$;

create or replace function sidecar.check_expected(p_path text, p_expected bigint, p_current bigint)
returns void language plpgsql immutable set search_path = '' as $$
begin
  if p_expected is not null and p_expected < 0 then
    raise sqlstate '22023' using message = format('expected_version must be >= 0, got %s', p_expected);
  end if;
  if p_expected is not null and p_expected <> p_current then
    raise sqlstate 'PT409'
      using message = 'version conflict',
            detail = jsonb_build_object('file_path', p_path, 'expected_version', p_expected,
                                        'current_version', p_current)::text,
            hint = 'fetch the current version and retry with it';
  end if;
end $$;

-- The stored form of a body: (content as stored, bytes). Binary input is base64 (line breaks
-- allowed) and is stored re-encoded without them.
create or replace function sidecar.decode_content(p_content text, p_file_type text,
                                                  out stored text, out bytes bytea)
language plpgsql immutable set search_path = '' as $$
begin
  if p_content is null then
    raise sqlstate '22004' using message = 'content is required';
  end if;
  if p_file_type = 'binary' then
    begin
      bytes := decode(p_content, 'base64');
    exception when others then
      raise sqlstate '22023' using message = 'binary content is not valid base64';
    end;
    stored := translate(encode(bytes, 'base64'), E'\n', '');
  else
    stored := p_content;
    bytes := convert_to(p_content, 'UTF8');
  end if;
end $$;

-- The current row of a path (null fields if the path never existed).
create or replace function sidecar.head(project_uuid uuid, p_path text) returns public.project_files
language sql stable set search_path = '' as $$
  select f.* from public.project_files f
   where f.project_id = project_uuid and f.file_path = p_path and f.is_current_version $$;

-- Writes a new version over v_cur (a tombstone when p_content is null); returns the new row.
create or replace function sidecar.write_version(
  project_uuid uuid, p_path text, p_file_type text, p_content text, p_hash text, p_size bigint,
  v_cur public.project_files, p_seq bigint)
returns public.project_files language plpgsql set search_path = '' as $$
declare
  v_new public.project_files;
  v_author text := sidecar.author();
begin
  if v_cur.id is not null then
    update public.project_files set is_current_version = false where id = v_cur.id;
  end if;
  insert into public.project_files (project_id, file_path, file_type, content, content_hash, size,
                                    version, deleted, parent_version_id, is_current_version,
                                    created_by, last_modified_by, seq)
  values (project_uuid, p_path, coalesce(p_file_type, v_cur.file_type, 'text'), p_content, p_hash,
          p_size, coalesce(v_cur.version, 0) + 1, p_content is null, v_cur.id, true,
          case when v_cur.id is null or v_cur.deleted then v_author else v_cur.created_by end,
          v_author, p_seq)
  returning * into v_new;
  return v_new;
end $$;

-- 22023 when a live file would be both a file and a directory of another live file.
create or replace function sidecar.check_file_dir(project_uuid uuid, p_path text) returns void
language plpgsql stable set search_path = '' as $$
declare
  v_other text;
  v_parents text[] := '{}';
  v_parts text[] := string_to_array(p_path, '/');
begin
  for i in 1 .. coalesce(array_length(v_parts, 1), 1) - 1 loop
    v_parents := v_parents || array_to_string(v_parts[1:i], '/');
  end loop;
  select f.file_path into v_other from public.project_files f
   where f.project_id = project_uuid and f.is_current_version and not f.deleted
     and (f.file_path = any (v_parents)
          or f.file_path like replace(replace(p_path, '%', E'\\%'), '_', E'\\_') || '/%')
   limit 1;
  if v_other is not null then
    raise sqlstate '22023'
      using message = format('%L and %L cannot both exist: one is a directory of the other',
                             p_path, v_other);
  end if;
end $$;

-- A file:update entry: the body inline when it fits p_budget (bytes), else only its size.
create or replace function sidecar.update_entry(v_row public.project_files, p_budget bigint)
returns jsonb language sql immutable set search_path = '' as $$
  select jsonb_build_object('file_path', v_row.file_path, 'version', v_row.version,
                            'content_hash', v_row.content_hash, 'size', v_row.size)
         || case when sidecar.inline_cost(v_row.content) > least(p_budget, sidecar.inline_max())
                   then '{}'::jsonb
                 when v_row.file_type = 'binary'
                   then jsonb_build_object('content_b64', v_row.content)
                 else jsonb_build_object('content', v_row.content) end $$;

-- The API's view of one row (get_project_file, list_current_files, project_snapshot).
create or replace function sidecar.file_json(v_row public.project_files, p_with_content boolean)
returns jsonb language sql immutable set search_path = '' as $$
  select jsonb_build_object('file_path', v_row.file_path, 'version', v_row.version,
                            'deleted', v_row.deleted, 'file_type', v_row.file_type,
                            'content_hash', v_row.content_hash, 'size', v_row.size,
                            'seq', v_row.seq, 'updated_at', sidecar.ms(v_row.updated_at))
         || case when not p_with_content or v_row.deleted then '{}'::jsonb
                 when v_row.file_type = 'binary'
                   then jsonb_build_object('content_b64', v_row.content)
                 else jsonb_build_object('content', v_row.content) end $$;

-- Stamps a payload (seq, timestamp, sender), logs it when it has a seq, and broadcasts it to
-- the project's private topic in the caller's transaction. realtime.send swallows its own
-- failures (a missing partition, an oversize row) as a WARNING; the event log still has the
-- event, so a subscriber that sees the seq gap fills it with project_events_since.
create or replace function sidecar.emit(project_uuid uuid, p_seq bigint, p_event text,
                                        p_payload jsonb)
returns jsonb language plpgsql set search_path = '' set timezone to 'UTC' as $$
declare
  v_payload jsonb := (p_payload - 'id' - 'seq' - 'timestamp' - 'sender')
                     || jsonb_build_object('timestamp', sidecar.ms(clock_timestamp()),
                                           'sender', sidecar.sender());
begin
  if p_seq is not null then
    v_payload := v_payload || jsonb_build_object('seq', p_seq);
    insert into sidecar.events (project_id, seq, event, payload)
    values (project_uuid, p_seq, p_event, v_payload);
  end if;
  perform realtime.send(v_payload, p_event, 'project:' || project_uuid::text, true);
  return v_payload;
end $$;

create or replace function sidecar.write_answer(p_path text, p_version bigint, p_seq bigint,
                                                p_hash text)
returns jsonb language sql immutable set search_path = '' as $$
  select jsonb_build_object('file_path', p_path, 'version', p_version, 'seq', p_seq,
                            'content_hash', p_hash) $$;

-- ---------------------------------------------------------------------------------------------
-- RPCs
-- ---------------------------------------------------------------------------------------------

create or replace function public.register_project(project_uuid uuid)
returns jsonb language plpgsql security definer set search_path = '' set timezone to 'UTC' as $$
begin
  if sidecar.claim_role() <> 'service_role' then
    raise sqlstate '42501' using message = 'register_project needs the service role';
  end if;
  if project_uuid is null then
    raise sqlstate '22004' using message = 'project_uuid is required';
  end if;
  insert into sidecar.projects (project_id) values (project_uuid) on conflict do nothing;
  return (select jsonb_build_object('project_id', p.project_id, 'seq', p.seq)
            from sidecar.projects p where p.project_id = project_uuid);
end $$;

-- Writes p_content at p_file_path. expected_version: null = last write wins, 0 = the path must
-- not exist (or be a tombstone of version 0, which cannot happen), n = the head must be n.
-- The same bytes again are a no-op: the answer has the head's version and seq null.
create or replace function public.upsert_project_file(
  project_uuid uuid, p_file_path text, p_content text, p_file_type text default 'text',
  expected_version bigint default null)
returns jsonb language plpgsql security definer set search_path = '' set timezone to 'UTC' as $$
declare
  v_type text := coalesce(nullif(p_file_type, ''), 'text');
  v_body record;
  v_hash text;
  v_seq bigint;
  v_cur public.project_files;
  v_new public.project_files;
begin
  perform sidecar.authorize(project_uuid, true);
  p_file_path := sidecar.check_path(p_file_path);
  v_body := sidecar.decode_content(p_content, v_type);
  v_hash := encode(sha256(v_body.bytes), 'hex');
  v_seq := sidecar.lock_project(project_uuid) + 1;
  v_cur := sidecar.head(project_uuid, p_file_path);
  perform sidecar.check_expected(p_file_path, expected_version, coalesce(v_cur.version, 0));
  if v_cur.id is not null and not v_cur.deleted and v_cur.content_hash = v_hash then
    return sidecar.write_answer(p_file_path, v_cur.version, null, v_hash);
  end if;
  update sidecar.projects set seq = v_seq where project_id = project_uuid;
  v_new := sidecar.write_version(project_uuid, p_file_path, v_type, v_body.stored, v_hash,
                                 length(v_body.bytes), v_cur, v_seq);
  perform sidecar.check_file_dir(project_uuid, p_file_path);
  perform sidecar.emit(project_uuid, v_seq, 'file:update',
                       sidecar.update_entry(v_new, sidecar.inline_max()));
  return sidecar.write_answer(p_file_path, v_new.version, v_seq, v_hash);
end $$;

-- A tombstone at the next version. Deleting an absent or already deleted path is a no-op
-- (no seq, no event) that answers with the head's version.
create or replace function public.delete_project_file(
  project_uuid uuid, p_file_path text, expected_version bigint default null)
returns jsonb language plpgsql security definer set search_path = '' set timezone to 'UTC' as $$
declare
  v_seq bigint;
  v_cur public.project_files;
  v_new public.project_files;
begin
  perform sidecar.authorize(project_uuid, true);
  p_file_path := sidecar.check_path(p_file_path);
  v_seq := sidecar.lock_project(project_uuid) + 1;
  v_cur := sidecar.head(project_uuid, p_file_path);
  perform sidecar.check_expected(p_file_path, expected_version, coalesce(v_cur.version, 0));
  if v_cur.id is null or v_cur.deleted then
    return sidecar.write_answer(p_file_path, coalesce(v_cur.version, 0), null, null);
  end if;
  update sidecar.projects set seq = v_seq where project_id = project_uuid;
  v_new := sidecar.write_version(project_uuid, p_file_path, null, null, null, null, v_cur, v_seq);
  perform sidecar.emit(project_uuid, v_seq, 'file:delete',
                       jsonb_build_object('file_path', p_file_path, 'version', v_new.version));
  return sidecar.write_answer(p_file_path, v_new.version, v_seq, null);
end $$;

-- Several writes as one unit: all of them or (on any error, a conflict included) none; one
-- seq and one bulk:apply event for the entries that change something. files: a JSON array of
-- {file_path, action?: 'update' | 'delete', content | content_b64, file_type?,
-- expected_version?}. content_b64 means binary. Answer: {seq (null if nothing changed),
-- files: [{file_path, action, version, content_hash, changed}]} in path order.
create or replace function public.bulk_upsert_project_files(project_uuid uuid, files jsonb)
returns jsonb language plpgsql security definer set search_path = '' set timezone to 'UTC' as $$
declare
  v_seq bigint;
  v_entry jsonb;
  v_path text;
  v_action text;
  v_type text;
  v_expected bigint;
  v_body record;
  v_hash text;
  v_cur public.project_files;
  v_new public.project_files;
  v_seen text[] := '{}';
  v_updated text[] := '{}';
  v_events jsonb := '[]'::jsonb;
  v_answers jsonb := '[]'::jsonb;
  v_budget bigint := sidecar.inline_max();
  v_item jsonb;
begin
  perform sidecar.authorize(project_uuid, true);
  if files is null or jsonb_typeof(files) <> 'array' or jsonb_array_length(files) = 0 then
    raise sqlstate '22023' using message = 'files must be a non-empty JSON array';
  end if;
  if jsonb_array_length(files) > 10000 then
    raise sqlstate '22023' using message = 'at most 10000 files per bulk';
  end if;
  v_seq := sidecar.lock_project(project_uuid) + 1;
  for v_entry in
    select e from jsonb_array_elements(files) e order by e ->> 'file_path' collate "C"
  loop
    if jsonb_typeof(v_entry) <> 'object' then
      raise sqlstate '22023' using message = 'every bulk entry must be an object';
    end if;
    v_path := sidecar.check_path(v_entry ->> 'file_path');
    if v_path = any (v_seen) then
      raise sqlstate '22023' using message = format('%L appears twice in the bulk', v_path);
    end if;
    v_seen := v_seen || v_path;
    v_action := coalesce(v_entry ->> 'action', 'update');
    if jsonb_typeof(v_entry -> 'expected_version') not in ('number', 'null') then
      raise sqlstate '22023' using message = format('%L: expected_version must be a number', v_path);
    end if;
    v_expected := (v_entry ->> 'expected_version')::bigint;
    v_cur := sidecar.head(project_uuid, v_path);
    perform sidecar.check_expected(v_path, v_expected, coalesce(v_cur.version, 0));
    if v_action = 'delete' then
      if v_cur.id is null or v_cur.deleted then
        v_answers := v_answers || jsonb_build_object('file_path', v_path, 'action', 'delete',
          'version', coalesce(v_cur.version, 0), 'content_hash', null, 'changed', false);
        continue;
      end if;
      v_new := sidecar.write_version(project_uuid, v_path, null, null, null, null, v_cur, v_seq);
      v_events := v_events || jsonb_build_object('action', 'delete', 'file_path', v_path,
                                                 'version', v_new.version);
      v_answers := v_answers || jsonb_build_object('file_path', v_path, 'action', 'delete',
        'version', v_new.version, 'content_hash', null, 'changed', true);
      continue;
    end if;
    if v_action <> 'update' then
      raise sqlstate '22023' using message = format('%L: action must be update or delete', v_path);
    end if;
    if (v_entry ? 'content') = (v_entry ? 'content_b64') then
      raise sqlstate '22023' using message = format('%L: exactly one of content, content_b64', v_path);
    end if;
    v_type := case when v_entry ? 'content_b64' then 'binary'
                   else coalesce(nullif(v_entry ->> 'file_type', ''), 'text') end;
    if v_type = 'binary' and v_entry ? 'content' then
      raise sqlstate '22023' using message = format('%L: binary files travel as content_b64', v_path);
    end if;
    v_body := sidecar.decode_content(coalesce(v_entry ->> 'content', v_entry ->> 'content_b64'),
                                     v_type);
    v_hash := encode(sha256(v_body.bytes), 'hex');
    if v_cur.id is not null and not v_cur.deleted and v_cur.content_hash = v_hash then
      v_answers := v_answers || jsonb_build_object('file_path', v_path, 'action', 'update',
        'version', v_cur.version, 'content_hash', v_hash, 'changed', false);
      continue;
    end if;
    v_new := sidecar.write_version(project_uuid, v_path, v_type, v_body.stored, v_hash,
                                   length(v_body.bytes), v_cur, v_seq);
    v_updated := v_updated || v_path;
    v_item := sidecar.update_entry(v_new, v_budget);
    if v_item ? 'content' or v_item ? 'content_b64' then
      v_budget := v_budget - sidecar.inline_cost(v_new.content);
    end if;
    v_events := v_events || (jsonb_build_object('action', 'update') || v_item);
    v_answers := v_answers || jsonb_build_object('file_path', v_path, 'action', 'update',
      'version', v_new.version, 'content_hash', v_hash, 'changed', true);
  end loop;
  if jsonb_array_length(v_events) = 0 then
    return jsonb_build_object('seq', null, 'files', v_answers);
  end if;
  -- After every entry is written, so a bulk may delete 'a' and create 'a/b'.
  foreach v_path in array v_updated loop
    perform sidecar.check_file_dir(project_uuid, v_path);
  end loop;
  update sidecar.projects set seq = v_seq where project_id = project_uuid;
  perform sidecar.emit(project_uuid, v_seq, 'bulk:apply', jsonb_build_object('files', v_events));
  return jsonb_build_object('seq', v_seq, 'files', v_answers);
end $$;

-- One path with its body: the head, or with p_version that version (versions are immutable
-- rows, so a subscriber fetching the body of an event it holds gets exactly those bytes, even
-- after newer writes). A tombstone has deleted = true and no body. Null when the path (or that
-- version) never existed or the project is not registered.
drop function if exists public.get_project_file(uuid, text);
create or replace function public.get_project_file(project_uuid uuid, p_file_path text,
                                                   p_version bigint default null)
returns jsonb language plpgsql stable security definer set search_path = '' set timezone to 'UTC'
as $$
declare
  v_row public.project_files;
begin
  perform sidecar.authorize(project_uuid, false);
  if p_version is null then
    v_row := sidecar.head(project_uuid, p_file_path);
  else
    select f.* into v_row from public.project_files f
     where f.project_id = project_uuid and f.file_path = p_file_path and f.version = p_version;
  end if;
  if v_row.id is null then
    return null;
  end if;
  return sidecar.file_json(v_row, true);
end $$;

-- Every live file with its body, in path order ([] for an unknown project).
create or replace function public.list_current_files(project_uuid uuid)
returns jsonb language plpgsql stable security definer set search_path = '' set timezone to 'UTC'
as $$
begin
  perform sidecar.authorize(project_uuid, false);
  return coalesce((select jsonb_agg(sidecar.file_json(f, true) order by f.file_path collate "C")
                     from public.project_files f
                    where f.project_id = project_uuid and f.is_current_version
                      and not f.deleted), '[]'::jsonb);
end $$;

-- {project_id, seq, created_at (ms, this transaction's start), files: [{file_path, version,
-- content_hash, file_type, size, ...}]} read in ONE statement, so the files are exactly the
-- state after event `seq` (any MVCC snapshot sees a prefix of the commit order, which is the
-- seq order). with_content adds each body. Null for an unknown project. A snapshot built from
-- it may use replay since created_at: a write that started before it and committed after is
-- caught by the subscriber's seq check (it sees a gap and reads project_events_since).
create or replace function public.project_snapshot(project_uuid uuid,
                                                   with_content boolean default false)
returns jsonb language plpgsql stable security definer set search_path = '' set timezone to 'UTC'
as $$
declare
  v_snapshot jsonb;
begin
  perform sidecar.authorize(project_uuid, false);
  select jsonb_build_object(
           'project_id', p.project_id, 'seq', p.seq, 'created_at', sidecar.ms(now()),
           'files', coalesce((select jsonb_agg(sidecar.file_json(f, coalesce(with_content, false))
                                               order by f.file_path collate "C")
                                from public.project_files f
                               where f.project_id = p.project_id and f.is_current_version
                                 and not f.deleted), '[]'::jsonb))
    into v_snapshot
    from sidecar.projects p
   where p.project_id = project_uuid;
  return v_snapshot;
end $$;

-- The logged events after after_seq, in seq order, at most max_rows (1..1000) of them and about
-- 8 MiB of payload (at least one event): the page a subscriber reads to fill a gap that
-- broadcast replay (25 rows, 3 days) cannot. The caller pages on from the last seq it got.
create or replace function public.project_events_since(project_uuid uuid, after_seq bigint,
                                                       max_rows int default 1000)
returns table (seq bigint, event text, payload jsonb, created_at timestamptz)
language plpgsql stable security definer set search_path = '' set timezone to 'UTC' as $$
#variable_conflict use_column
begin
  perform sidecar.authorize(project_uuid, false);
  return query
    select page.seq, page.event, page.payload, page.created_at
      from (select e.seq, e.event, e.payload, e.created_at,
                   sum(octet_length(e.payload::text)) over (order by e.seq)
                     - octet_length(e.payload::text) as before_bytes
              from sidecar.events e
             where e.project_id = project_uuid and e.seq > coalesce(after_seq, 0)
             order by e.seq
             limit greatest(1, least(coalesce(max_rows, 1000), 1000))) page
     where page.before_bytes < 8388608
     order by page.seq;
end $$;

-- A container's report of a change it saw (file:local-change) or a conflict it resolved
-- (file:conflict), re-broadcast by the database with the token's sender and no seq: containers
-- never write on the channel themselves. The payload is an object of at most 200000 bytes.
create or replace function public.report_local_change(project_uuid uuid, payload jsonb,
                                                      p_event text default 'file:local-change')
returns void language plpgsql security definer set search_path = '' set timezone to 'UTC' as $$
begin
  perform sidecar.authorize(project_uuid, true);
  if coalesce(p_event, '') not in ('file:local-change', 'file:conflict') then
    raise sqlstate '22023' using message = 'p_event must be file:local-change or file:conflict';
  end if;
  if payload is null or jsonb_typeof(payload) <> 'object' then
    raise sqlstate '22023' using message = 'payload must be a JSON object';
  end if;
  if octet_length(payload::text) > 200000 then
    raise sqlstate '22023' using message = 'payload is larger than 200000 bytes';
  end if;
  perform sidecar.lock_project(project_uuid);
  perform sidecar.emit(project_uuid, null, p_event, payload);
end $$;

-- Asks the snapshot worker for a fresh snapshot (a sidecar that could not catch up). An open
-- request of the project is reused, so a crowd of sidecars makes one snapshot. The worker
-- listens on the channel 'sidecar_snapshot_requests' (payload: the project uuid).
create or replace function public.request_snapshot(project_uuid uuid, p_reason text default null,
                                                   p_last_seq bigint default null)
returns jsonb language plpgsql security definer set search_path = '' set timezone to 'UTC' as $$
declare
  v_id bigint;
begin
  perform sidecar.authorize(project_uuid, false);
  perform sidecar.lock_project(project_uuid);
  select r.id into v_id from sidecar.snapshot_requests r
   where r.project_id = project_uuid and r.done_at is null and r.claimed_at is null
   order by r.id limit 1;
  if v_id is null then
    insert into sidecar.snapshot_requests (project_id, session_id, reason, last_seq)
    values (project_uuid, coalesce(auth.jwt() ->> 'session_id', sidecar.sender()),
            left(p_reason, 500), p_last_seq)
    returning id into v_id;
  end if;
  perform pg_notify('sidecar_snapshot_requests', project_uuid::text);
  return jsonb_build_object('request_id', v_id);
end $$;

-- Deletes logged events older than p_before (never the newest event of a project, so seq
-- stays known). A subscriber whose gap reaches into the pruned range gets a page that starts
-- after its gap, sees the gap remain, and asks for a snapshot instead.
create or replace function sidecar.prune_events(p_before timestamptz) returns bigint
language sql set search_path = '' as $$
  with gone as (
    delete from sidecar.events e
     where e.created_at < p_before
       and e.seq < (select p.seq from sidecar.projects p where p.project_id = e.project_id)
    returning 1)
  select count(*) from gone $$;

-- ---------------------------------------------------------------------------------------------
-- Privileges: the API roles call the RPCs and nothing in schema sidecar
-- ---------------------------------------------------------------------------------------------

revoke all on all tables in schema sidecar from public, anon, authenticated, service_role;
revoke all on all functions in schema sidecar from public, anon, authenticated, service_role;

revoke all on function public.register_project(uuid) from public, anon, authenticated;
revoke all on function public.upsert_project_file(uuid, text, text, text, bigint) from public, anon;
revoke all on function public.delete_project_file(uuid, text, bigint) from public, anon;
revoke all on function public.bulk_upsert_project_files(uuid, jsonb) from public, anon;
revoke all on function public.get_project_file(uuid, text, bigint) from public, anon;
revoke all on function public.list_current_files(uuid) from public, anon;
revoke all on function public.project_snapshot(uuid, boolean) from public, anon;
revoke all on function public.project_events_since(uuid, bigint, int) from public, anon;
revoke all on function public.report_local_change(uuid, jsonb, text) from public, anon;
revoke all on function public.request_snapshot(uuid, text, bigint) from public, anon;

grant execute on function public.register_project(uuid) to service_role;
grant execute on function
  public.upsert_project_file(uuid, text, text, text, bigint),
  public.delete_project_file(uuid, text, bigint),
  public.bulk_upsert_project_files(uuid, jsonb),
  public.get_project_file(uuid, text, bigint),
  public.list_current_files(uuid),
  public.project_snapshot(uuid, boolean),
  public.project_events_since(uuid, bigint, int),
  public.report_local_change(uuid, jsonb, text),
  public.request_snapshot(uuid, text, bigint)
  to authenticated, service_role;

-- ---------------------------------------------------------------------------------------------
-- Realtime Authorization for the private topic 'project:<uuid>'
-- ---------------------------------------------------------------------------------------------
-- Realtime evaluates these at join (read) and on a client's first broadcast (write), with the
-- token's claims and realtime.topic() set. Reading needs a project_id claim naming the topic's
-- project. There is NO insert policy: no token may broadcast on the channel, because Realtime
-- passes a client's payload through unchanged (meta included) and a writer could forge a
-- database event. sidecar/sql/options/client_broadcast.sql is the opt-in for an editor that
-- still broadcasts from the browser. service_role has BYPASSRLS and may do both.

drop policy if exists "sidecar: project token reads its channel" on realtime.messages;
create policy "sidecar: project token reads its channel" on realtime.messages
  for select to authenticated
  using (realtime.messages.extension = 'broadcast'
         and realtime.messages.topic = (select realtime.topic())
         and realtime.messages.topic = 'project:' || lower((select auth.jwt()) ->> 'project_id'));
