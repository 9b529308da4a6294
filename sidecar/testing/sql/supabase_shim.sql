-- TEST ONLY, never deployed: the part of a Supabase database that sidecar/sql/ relies on, for a
-- throwaway PostgreSQL 15 cluster (sidecar/testing/postgres.py applies it as the bootstrap
-- superuser `supabase_admin`, then the migration as `postgres`).
--
-- Pinned to what Supabase ships today:
-- * roles: supabase/postgres migrations/db/init-scripts/00000000000000-initial-schema.sql and
--   10000000000000_demote-postgres.sql (`postgres` is NOSUPERUSER ... REPLICATION BYPASSRLS);
-- * auth.jwt()/uid()/role(): supabase/auth migrations/20240624145325_recreate_auth_functions;
-- * realtime.messages (daily partitions), realtime.send, realtime.topic(): supabase/realtime
--   2.129.8 (833cf36) lib/realtime/tenants/repo/migrations, send as of 20260605120000.
-- Plus one addition of ours: a NOTIFY trigger on realtime.messages that feeds the Realtime test
-- server (sidecar/testing/realtime) the committed rows, where the real server reads the WAL.

-- Roles ---------------------------------------------------------------------------------------
create role postgres login createrole createdb replication bypassrls;
create role anon nologin noinherit;
create role authenticated nologin noinherit;
create role service_role nologin noinherit bypassrls;
create role authenticator login noinherit;
create role supabase_realtime_admin nologin noinherit;
grant anon, authenticated, service_role to authenticator;
grant anon, authenticated, service_role to postgres with admin option;
-- Lets `postgres` create policies on realtime.messages, as the dashboard's SQL editor does.
grant supabase_realtime_admin to postgres;

do $$ begin
  execute format('grant create, connect, temporary on database %I to postgres', current_database());
end $$;
alter schema public owner to postgres;
grant usage on schema public to anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  grant all on tables to anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  grant all on functions to anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  grant all on sequences to anon, authenticated, service_role;

-- auth -----------------------------------------------------------------------------------------
create schema auth;
grant usage on schema auth to anon, authenticated, service_role, postgres;

create or replace function auth.uid() returns uuid language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid $$;

create or replace function auth.role() returns text language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text $$;

create or replace function auth.email() returns text language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.email', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
  )::text $$;

create or replace function auth.jwt() returns jsonb language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb $$;

grant execute on all functions in schema auth to anon, authenticated, service_role, postgres;

-- realtime -------------------------------------------------------------------------------------
create schema realtime authorization supabase_realtime_admin;
grant usage on schema realtime to postgres, anon, authenticated, service_role;
set role supabase_realtime_admin;

create table realtime.messages (
  topic text not null,
  extension text not null,
  payload jsonb,
  event text,
  private boolean default false,
  updated_at timestamp not null default now(),
  inserted_at timestamp not null default now(),
  id uuid not null default gen_random_uuid(),
  binary_payload bytea,
  primary key (id, inserted_at)
) partition by range (inserted_at);
alter table realtime.messages
  add constraint messages_payload_exclusive
  check (payload is null or binary_payload is null) not valid;
create index messages_inserted_at_topic_index on realtime.messages (inserted_at desc, topic)
  where extension = 'broadcast' and private is true;
alter table realtime.messages enable row level security;

create or replace function realtime.topic() returns text language sql stable as $$
  select nullif(current_setting('realtime.topic', true), '')::text $$;

create or replace function realtime.send(payload jsonb, event text, topic text,
                                         private boolean default true)
returns void as $$
declare
  generated_id uuid;
  final_payload jsonb;
begin
  begin
    generated_id := gen_random_uuid();
    if payload ? 'id' then
      final_payload := payload;
    else
      final_payload := jsonb_set(payload, '{id}', to_jsonb(generated_id));
    end if;
    execute format('SET LOCAL realtime.topic TO %L', topic);
    insert into realtime.messages (id, payload, event, topic, private, extension)
    values (generated_id, final_payload, event, topic, private, 'broadcast');
  exception
    when others then
      raise warning 'WarnSendingBroadcastMessage: %', SQLERRM;
  end;
end;
$$ language plpgsql;

-- Realtime creates the partitions for yesterday .. today+3 (UTC) when it connects to a tenant
-- and on every janitor run; the test Realtime server calls this at start for the same effect.
create or replace function realtime.create_messages_partitions() returns void
language plpgsql as $$
declare
  d date;
begin
  for d in select generate_series((now() at time zone 'utc')::date - 1,
                                  (now() at time zone 'utc')::date + 3, interval '1 day')::date
  loop
    execute format(
      'create table if not exists realtime.%I partition of realtime.messages for values from (%L) to (%L)',
      'messages_' || to_char(d, 'YYYY_MM_DD'), d, d + 1);
  end loop;
end $$;
select realtime.create_messages_partitions();

-- Ours, test only: one notification per committed broadcast row (notifications are delivered
-- at commit and in commit order; a rolled-back authorization probe never notifies). Only the
-- key goes out: NOTIFY payloads are limited to 8000 bytes.
create or replace function realtime.test_notify_message() returns trigger
language plpgsql as $$
begin
  perform pg_notify('realtime_messages',
                    json_build_object('id', new.id, 'inserted_at', new.inserted_at)::text);
  return null;
end $$;
create trigger test_notify_message after insert on realtime.messages
  for each row when (new.extension = 'broadcast') execute function realtime.test_notify_message();

create or replace function realtime.shim_version() returns text language sql immutable as $$
  select 'supabase/realtime 2.129.8 (833cf36)'::text $$;

reset role;
grant select, insert, update on realtime.messages to postgres, anon, authenticated, service_role;
grant execute on all functions in schema realtime to postgres, anon, authenticated, service_role;
