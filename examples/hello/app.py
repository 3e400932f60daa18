"""Returns a greeting for ``event["name"]``."""


def handler(event, context):
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    print(f"greeting {name}")
    return {"message": f"Hello, {name}!"}
