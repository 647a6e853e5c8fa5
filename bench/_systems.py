"""The benches' system names: ``method[:budget[:option=value...]]`` (``sentencekv:2048``,
``sentencekv+kivi:2048:prefill_offload=true:prefill_budget=4096``)."""

from __future__ import annotations


def option_value(v: str):
    """A method option's text -> bool (``true``/``false``), int, float or the text itself."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_system(spec: str) -> tuple[str, int | None, dict]:
    """``method[:budget[:option=value...]]`` -> ``(method, budget or None, options)``."""
    name, _, rest = spec.partition(":")
    budget, *opts = rest.split(":") if rest else [""]
    return name, int(budget) if budget else None, {k: option_value(v) for k, _, v in (o.partition("=") for o in opts)}
