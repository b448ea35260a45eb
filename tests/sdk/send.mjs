// Sends the fixed event set of tests/sdk/README.md through the unmodified
// `@segment/analytics-node` SDK (plain JSON: it has no gzip option), then
// closes and flushes, and exits 1 if the SDK reports any delivery error.
//
// Usage: CDP_SDK_NODE_DIR=DIR/node node send.mjs COLLECTOR_URL WRITE_KEY TAG
// CDP_SDK_NODE_DIR is the `npm install --prefix` directory holding the SDK
// (scripts/sdk-deps DIR installs it in DIR/node).
// Prints `sent TYPE MESSAGE_ID` per delivered event and `delivered N` at the end.

import { createRequire } from 'node:module'
import path from 'node:path'

const SDK = 'node'

const [url, writeKey, tag] = process.argv.slice(2)
if (!url || !writeKey || !tag) {
  console.error('usage: CDP_SDK_NODE_DIR=DIR node send.mjs COLLECTOR_URL WRITE_KEY TAG')
  process.exit(2)
}
// The SDK lives in node_modules under CDP_SDK_NODE_DIR, not beside this file:
// resolve it from there (ES module imports ignore NODE_PATH).
const base = process.env.CDP_SDK_NODE_DIR
const require = createRequire(base ? path.join(path.resolve(base), 'package.json') : import.meta.url)
const { Analytics } = require('@segment/analytics-node')

const analytics = new Analytics({
  writeKey,
  host: url,
  // A failing collector fails the run in seconds, not after hours of backoff.
  maxRetries: 2,
  maxTotalBackoffDuration: 30,
  maxRateLimitDuration: 30,
  httpRequestTimeout: 15000,
})

const errors = []
analytics.on('error', (e) => errors.push(`${e.code}: ${e.reason}`))

let calls = 0
let delivered = 0
// Each call's callback runs once its batch is answered: with an error when
// the collector refused it or retries ran out.
const done = (type) => {
  calls += 1
  return (err, ctx) => {
    const id = ctx?.event?.messageId
    if (err) {
      errors.push(`${type} ${id}: ${err}`)
      return
    }
    delivered += 1
    console.log(`sent ${type} ${id}`)
  }
}

const person = `${tag}-${SDK}`
const userId = `${person}-user`
const anonymousId = `${person}-anon`
const email = `${person}@example.org`

// 1. Browsing before signing in: only the anonymous id.
analytics.track({ anonymousId, event: 'Product Viewed', properties: { sku: `${person}-sku` } }, done('track'))
// 2. Signing in: the user id joins the anonymous id; traits carry the email.
analytics.identify(
  { userId, anonymousId, traits: { email, first_name: 'Ada', last_name: 'Node' } },
  done('identify'),
)
// 3. The order, as a server sends it: user id only.
analytics.track(
  { userId, event: 'Order Completed', properties: { order_id: `${person}-o1`, revenue: 129.5 } },
  done('track'),
)
// 4. A page view, browser-style: both ids.
analytics.page({ userId, anonymousId, name: 'Order Confirmation', properties: { path: '/thanks' } }, done('page'))
// 5. Alias: the anonymous id is the user's previous id.
analytics.alias({ userId, previousId: anonymousId }, done('alias'))

await analytics.closeAndFlush({ timeout: 60000 })
for (const e of errors) console.error(`error ${e}`)
if (errors.length || delivered !== calls) {
  console.error(`delivered ${delivered} of ${calls}`)
  process.exit(1)
}
console.log(`delivered ${delivered}`)
