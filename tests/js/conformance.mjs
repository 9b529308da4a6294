// realtime-js conformance check against sidecar.testing.realtime_server.
//
// For each protocol version (2.0.0, realtime-js' default, then 1.0.0): connect with the anon key,
// join a private channel with a user JWT and replay since 0, expect the stored row replayed
// (meta.replayed true), then a live realtime.send broadcast (injected through POST /_admin/send,
// delivered with meta.id) and a REST broadcast sent by this client through httpSend().
// Exits 0 on success, 1 with a reason on stderr otherwise.
//
// Environment: RT_URL (http://host:port/realtime/v1), RT_ADMIN (http://host:port),
// RT_APIKEY, RT_TOKEN, RT_TOPIC (sub-topic), RT_REPLAY_ID (id of the row stored beforehand).

import { RealtimeClient } from '@supabase/realtime-js'

const env = (name) => {
  const value = process.env[name]
  if (!value) throw new Error(`missing environment variable ${name}`)
  return value
}

const URL_ = env('RT_URL')
const ADMIN = env('RT_ADMIN')
const APIKEY = env('RT_APIKEY')
const TOKEN = env('RT_TOKEN')
const TOPIC = env('RT_TOPIC')
const REPLAY_ID = env('RT_REPLAY_ID')
const TIMEOUT_MS = 10000

function withTimeout(promise, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), TIMEOUT_MS)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

async function check(vsn) {
  const client = new RealtimeClient(URL_, { params: { apikey: APIKEY }, vsn })
  await client.setAuth(TOKEN)
  const channel = client.channel(TOPIC, {
    config: { private: true, broadcast: { self: true, replay: { since: 0, limit: 25 } } },
  })
  const seen = []
  const waiters = []
  channel.on('broadcast', { event: '*' }, (msg) => {
    seen.push(msg)
    for (const w of waiters.splice(0)) w()
  })
  const waitFor = (pred, what) =>
    withTimeout(
      new Promise((resolve) => {
        const test = () => {
          const hit = seen.find(pred)
          if (hit) resolve(hit)
          else waiters.push(test)
        }
        test()
      }),
      `${what} (vsn ${vsn})`,
    )

  await withTimeout(
    new Promise((resolve, reject) => {
      channel.subscribe((status, err) => {
        if (status === 'SUBSCRIBED') resolve()
        else if (status !== 'CLOSED') reject(new Error(`subscribe: ${status} ${err ?? ''}`))
      })
    }),
    `SUBSCRIBED (vsn ${vsn})`,
  )

  const replayed = await waitFor((m) => m.meta?.id === REPLAY_ID, 'the replayed row')
  if (replayed.meta.replayed !== true) throw new Error(`replayed row lacks meta.replayed: ${JSON.stringify(replayed)}`)
  if (replayed.payload?.id !== REPLAY_ID) throw new Error(`replayed payload.id mismatch: ${JSON.stringify(replayed)}`)

  const res = await fetch(`${ADMIN}/_admin/send`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ topic: TOPIC, event: 'file:update', payload: { path: `live-${vsn}.txt` } }),
  })
  if (!res.ok) throw new Error(`/_admin/send answered ${res.status}`)
  const { id } = await res.json()
  const live = await waitFor((m) => m.meta?.id === id, 'the live realtime.send broadcast')
  if (live.event !== 'file:update' || live.payload.path !== `live-${vsn}.txt` || live.payload.id !== id) {
    throw new Error(`unexpected live broadcast: ${JSON.stringify(live)}`)
  }
  if (live.meta.replayed) throw new Error('a live broadcast must not be marked replayed')

  await channel.httpSend('rest:ping', { vsn })
  await waitFor((m) => m.event === 'rest:ping' && m.payload?.vsn === vsn, 'the REST broadcast')

  await client.removeAllChannels()
  client.disconnect()
  console.log(`ok vsn ${vsn}: replay, realtime.send and REST broadcast received`)
}

try {
  for (const vsn of ['2.0.0', '1.0.0']) await check(vsn)
  process.exit(0)
} catch (err) {
  console.error(`FAIL: ${err?.stack ?? err}`)
  process.exit(1)
}
