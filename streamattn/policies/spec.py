"""Policies written as short strings (command lines, benchmark flags, configs).

Grammar (``full``/``dense`` in any case; whitespace around names and values ignored)::

    spec    := "full" | "dense" | fields
    fields  := field ("," field)*          # "window" required; a repeated name: the last one wins
    field   := ("sinks" | "window" | "budget" | "every" | "block" | "topk" | "max_blocks"
                | "chunk" | "left" | "lookahead") "=" INT
             | "score=" scorer
             | "store=" ("device" | "cpu" | "disk") | "store_dir=" PATH        # retrieval only
    scorer  := "knorm" | "tova" | "h2o" | "snapkv" [":" INT [":" INT]]     # snapkv:WINDOW:KERNEL

    "sinks=4,window=1020"   -> SinkWindow(sinks=4, window=1020)
    "window=1024"           -> SinkWindow(sinks=0, window=1024)   (a plain sliding window)
    "full" / "dense"        -> Full()
    "sinks=4,window=64,budget=1024,score=h2o,every=64"
                            -> Compressed(4, 64, 1024, H2O(), 64)  (budget makes it compressed;
                               score defaults to tova, every to 64)
    "sinks=4,window=1020,block=128,topk=4[,max_blocks=N][,every=E]"
                            -> Retrieval(4, 1020, 128, 4, N, every=E)  (block makes it a retrieval
                               memory; topk defaults to 4, max_blocks to None: every block kept,
                               every to 1: each query chooses its own blocks)
    "sinks=4,window=1020,block=128,store=disk[,store_dir=/scratch]"
                            -> the store memory-mapped on disk (same results, other placement)
    "chunk=50,left=400,lookahead=10"
                            -> ChunkedContext(50, 400, 10)   (an encoder's chunks; no left: unbounded,
                               no lookahead: 0)

An absent ``sinks`` is 0 in every form. Two forms need a calibration profile (``streamattn
calibrate``; ``profile=`` path or dict) and give a ``PerLayer`` policy for a whole model:

    "sinks=4,window=64,budget=960,score=qfilters"      -> each layer's Q-Filter directions
    "heads=0.25|sinks=4,window=64,budget=2048,score=snapkv|sinks=4,window=252"
                            -> PerHead per layer: the best 25% retrieval heads of the model (or a
                               count, heads=N) get the first policy, the others the second

Malformed
specs raise ``ValueError`` naming the expected forms; out-of-range values raise the policy's own
``ValueError`` (e.g. ``window must be >= 1``).
"""

from __future__ import annotations

from streamattn.policies.base import Policy
from streamattn.policies.chunked_context import ChunkedContext
from streamattn.policies.compressed import Compressed
from streamattn.policies.full import Full
from streamattn.policies.retrieval import Retrieval
from streamattn.policies.scores import H2O, TOVA, KeyNorm, Scorer, SnapKV
from streamattn.policies.sink_window import SinkWindow

_FORMS = (
    "'sinks=S,window=W', 'window=W', 'sinks=S,window=W,budget=B[,score=NAME][,every=E]', "
    "'sinks=S,window=W,block=N,topk=K[,max_blocks=M][,every=E][,store=device|cpu|disk][,store_dir=PATH]', "
    "'chunk=C[,left=L][,lookahead=R]' or 'full'"
)
_SCORERS = "knorm, tova, h2o, snapkv[:WINDOW[:KERNEL]]"
_INTS = ("sinks", "window", "budget", "every", "block", "topk", "max_blocks", "chunk", "left", "lookahead")
_CHUNKED = ("chunk", "left", "lookahead")
_RETRIEVAL = ("block", "topk", "max_blocks")


def _is_int(value: str) -> bool:
    return value.strip().removeprefix("-").isdecimal()


def parse_scorer(spec: str) -> Scorer:
    """The scorer a name names (``knorm``, ``tova``, ``h2o``, ``snapkv[:WINDOW[:KERNEL]]``)."""
    name, *args = [part.strip() for part in spec.strip().lower().split(":")]
    simple = {"knorm": KeyNorm, "tova": TOVA, "h2o": H2O}
    if name in simple and not args:
        return simple[name]()
    if name == "snapkv" and len(args) <= 2 and all(_is_int(a) for a in args):
        return SnapKV(*(int(a) for a in args))
    if name == "qfilters":
        raise ValueError(
            "score=qfilters needs per-head directions calibrated for a model: run `streamattn calibrate` and "
            "pass its profile (--profile), or build streamattn.scores.QFilters from one"
        )
    raise ValueError(f"bad scorer {spec!r}: expected one of {_SCORERS}")


def scorer_spec(scorer: Scorer) -> str:
    """The name ``parse_scorer`` reads back (Q-Filters, which a string cannot carry: ``qfilters``)."""
    if isinstance(scorer, SnapKV):
        return f"snapkv:{scorer.window}:{scorer.kernel}"
    return {KeyNorm: "knorm", TOVA: "tova", H2O: "h2o"}.get(type(scorer), scorer.name)


def policy_spec(policy: Policy) -> str:
    """A policy as a spec string (``parse_policy(policy_spec(p)) == p`` for the policies a string can carry)."""
    if isinstance(policy, Full):
        return "full"
    if isinstance(policy, ChunkedContext):
        left = "" if policy.left is None else f",left={policy.left}"
        return f"chunk={policy.chunk}{left},lookahead={policy.lookahead}"
    if isinstance(policy, SinkWindow):
        return f"sinks={policy.sinks},window={policy.window}" if policy.sinks else f"window={policy.window}"
    if isinstance(policy, Retrieval):
        keep = "" if policy.max_blocks is None else f",max_blocks={policy.max_blocks}"
        if policy.every != 1:
            keep += f",every={policy.every}"
        if policy.store != "device":
            keep += f",store={policy.store}"
        if policy.store_dir is not None:
            keep += f",store_dir={policy.store_dir}"
        return f"sinks={policy.sinks},window={policy.window},block={policy.block},topk={policy.topk}{keep}"
    if isinstance(policy, Compressed):
        return (
            f"sinks={policy.sinks},window={policy.window},budget={policy.budget},"
            f"score={scorer_spec(policy.score)},every={policy.every}"
        )
    return policy.name


def _needs_profile(spec: str, profile: object) -> None:
    if profile is None:
        raise ValueError(
            f"policy {spec!r} needs a calibration profile: run `streamattn calibrate --out profile.json` "
            "and pass it (--profile profile.json)"
        )


def _per_head(spec: str, profile: object) -> Policy:
    from streamattn.policies.per_head import PerHead
    from streamattn.policies.per_layer import PerLayer

    parts = spec.split("|")
    key, _, value = parts[0].partition("=")
    if len(parts) != 3 or key.strip() != "heads" or not value.strip():
        raise ValueError(f"bad per-head policy {spec!r}: expected 'heads=F|RETRIEVAL POLICY|STREAMING POLICY'")
    value = value.strip()
    try:
        heads: float | int = int(value) if value.isdecimal() else float(value)
    except ValueError:
        raise ValueError(f"bad per-head policy {spec!r}: heads must be a fraction in (0, 1] or a count") from None
    retrieval, streaming = parse_policy(parts[1]), parse_policy(parts[2])
    _needs_profile(spec, profile)
    layers = PerHead.from_profile(profile, retrieval=retrieval, streaming=streaming, heads=heads)
    return PerLayer(tuple(layers), label=spec.strip())


def parse_policy(spec: str, profile: object = None) -> Policy:
    """The policy a spec string names (grammar in the module docstring)."""
    if not isinstance(spec, str):
        raise TypeError(f"a policy spec is a str like {_FORMS}, got {type(spec).__name__}")
    if spec.strip().lower() in ("full", "dense"):
        return Full()
    if "|" in spec:
        return _per_head(spec, profile)
    fields: dict[str, int] = {}
    placement: dict[str, str] = {}
    score: Scorer | None = None
    qfilters = False
    for part in spec.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key == "score" and value.strip().lower() == "qfilters":
            qfilters = True
            continue
        if key == "score" and value.strip():
            score = parse_scorer(value)
            continue
        if key in ("store", "store_dir") and value.strip():
            placement[key] = value.strip()
            continue
        if key not in _INTS or not _is_int(value):
            raise ValueError(f"bad policy {spec!r}: expected {_FORMS}")
        fields[key] = int(value)
    if any(key in fields for key in _CHUNKED):
        if "chunk" not in fields or set(fields) - set(_CHUNKED) or score is not None or placement or qfilters:
            raise ValueError(f"bad policy {spec!r}: an encoder policy is 'chunk=C[,left=L][,lookahead=R]' alone")
        return ChunkedContext(fields["chunk"], fields.get("left"), fields.get("lookahead", 0))
    if "window" not in fields:
        raise ValueError(f"bad policy {spec!r}: 'window=W' is required (or 'full')")
    sinks = fields.get("sinks", 0)
    if qfilters:
        from streamattn.policies.per_layer import PerLayer
        from streamattn.policies.profile import qfilters_policies

        if "budget" not in fields:
            raise ValueError(
                f"bad policy {spec!r}: 'score' and 'every' belong to a compressed policy, which needs 'budget=B'"
            )
        _needs_profile(spec, profile)
        every = fields.get("every", 64)
        layers = qfilters_policies(profile, sinks=sinks, window=fields["window"], budget=fields["budget"], every=every)
        return PerLayer(tuple(layers), label=spec.strip())
    retrieval = [key for key in _RETRIEVAL if key in fields]
    if placement and "block" not in fields:
        raise ValueError(f"bad policy {spec!r}: 'store' and 'store_dir' belong to a retrieval policy ('block=N')")
    if retrieval:
        if "block" not in fields or "budget" in fields or score is not None:
            raise ValueError(
                f"bad policy {spec!r}: a retrieval policy is "
                "'sinks=S,window=W,block=N[,topk=K][,max_blocks=M][,every=E]'"
            )
        return Retrieval(
            sinks,
            fields["window"],
            fields["block"],
            fields.get("topk", 4),
            fields.get("max_blocks"),
            every=fields.get("every", 1),
            **placement,
        )
    if "budget" in fields:
        return Compressed(sinks, fields["window"], fields["budget"], score or TOVA(), fields.get("every", 64))
    if score is not None or "every" in fields:
        raise ValueError(
            f"bad policy {spec!r}: 'score' and 'every' belong to a compressed policy, which needs 'budget=B'"
        )
    return SinkWindow(sinks=sinks, window=fields["window"])
