"""Small files the tests write in the formats the scorers read."""
import json


def write_json(path, data, lines=False):
    """`data` as one JSON document, or one JSON line per item with `lines`; returns the path as a string."""
    with open(path, "w") as f:
        if lines:
            f.writelines(json.dumps(r) + "\n" for r in data)
        else:
            json.dump(data, f)
    return str(path)
