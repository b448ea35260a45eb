"""Sends the fixed event set of tests/sdk/README.md through the unmodified
`rudder-sdk-python` SDK (gzip bodies, its default), then flushes and exits 1 if the
SDK reports any delivery error.

Usage: send_segment.py COLLECTOR_URL WRITE_KEY TAG
Prints `sent TYPE MESSAGE_ID` per event and `delivered N` at the end.
"""

import sys

from rudderstack.analytics.client import Client

SDK = "rudder"


def main(argv):
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    url, write_key, tag = argv[1:]
    errors = []

    def on_error(error, batch):
        errors.append((error, [m.get("messageId") for m in batch]))

    client = Client(
        write_key,
        host=url,
        gzip=True,
        on_error=on_error,
        # A failing collector fails the run in seconds, not after 17 minutes of backoff.
        max_retries=2,
        timeout=15,
    )
    person = f"{tag}-{SDK}"
    user_id, anonymous_id = f"{person}-user", f"{person}-anon"
    email = f"{person}@example.org"
    sent = []

    def record(kind, result):
        ok, msg = result
        if not ok:
            errors.append((RuntimeError("queue full"), [msg.get("messageId")]))
        sent.append(msg["messageId"])
        print(f"sent {kind} {msg['messageId']}", flush=True)

    # 1. Browsing before signing in: only the anonymous id.
    record("track", client.track(anonymous_id=anonymous_id, event="Product Viewed", properties={"sku": f"{person}-sku"}))
    # 2. Signing in: the user id joins the anonymous id; traits carry the email
    #    (this SDK sends identify traits as `context.traits`, not `traits`).
    record(
        "identify",
        client.identify(
            user_id=user_id,
            anonymous_id=anonymous_id,
            traits={"email": email, "first_name": "Ada", "last_name": "Rudder"},
        ),
    )
    # 3. The order, as a server sends it: user id only.
    record(
        "track",
        client.track(user_id=user_id, event="Order Completed", properties={"order_id": f"{person}-o1", "revenue": 129.5}),
    )
    # 4. A page view, browser-style: both ids.
    record(
        "page",
        client.page(user_id=user_id, anonymous_id=anonymous_id, name="Order Confirmation", properties={"path": "/thanks"}),
    )
    # 5. Alias: the anonymous id is the user's previous id.
    record("alias", client.alias(previous_id=anonymous_id, user_id=user_id))

    client.shutdown()  # flush (waits for every batch, retries included), then stop the consumer
    for error, ids in errors:
        print(f"error {error} for {ids}", file=sys.stderr)
    if errors:
        return 1
    print(f"delivered {len(sent)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
