"""Returns the event it received; call it through the HTTP route ``/fn/http-echo/...``."""


def handler(event, context):
    return {"event": event}
