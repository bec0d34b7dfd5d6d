"""Policies written as short strings (command lines, benchmark flags, configs).

Grammar (``full``/``dense`` in any case; whitespace around names and values ignored)::

    spec    := "full" | "dense" | fields
    fields  := field ("," field)*          # "window" required; a repeated name: the last one wins
    field   := ("sinks" | "window") "=" INT

    "sinks=4,window=1020"  -> SinkWindow(sinks=4, window=1020)
    "window=1024"          -> SinkWindow(sinks=0, window=1024)   (a plain sliding window)
    "full" / "dense"       -> Full()

Malformed specs raise ``ValueError`` naming the expected forms; out-of-range values raise the
policy's own ``ValueError`` (e.g. ``window must be >= 1``).
"""

from __future__ import annotations

from streamattn.policies.base import Policy
from streamattn.policies.full import Full
from streamattn.policies.sink_window import SinkWindow

_FORMS = "'sinks=S,window=W', 'window=W' or 'full'"


def parse_policy(spec: str) -> Policy:
    """The policy a spec string names (grammar in the module docstring)."""
    if not isinstance(spec, str):
        raise TypeError(f"a policy spec is a str like {_FORMS}, got {type(spec).__name__}")
    if spec.strip().lower() in ("full", "dense"):
        return Full()
    fields: dict[str, int] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("sinks", "window") or not value.strip().removeprefix("-").isdecimal():
            raise ValueError(f"bad policy {spec!r}: expected {_FORMS}")
        fields[key.strip()] = int(value)
    if "window" not in fields:
        raise ValueError(f"bad policy {spec!r}: 'window=W' is required (or 'full')")
    return SinkWindow(sinks=fields.get("sinks", 0), window=fields["window"])
