"""Named benchmark suites: fixed grids of tasks x lengths x methods x budgets x samples.

    kvsift bench run --suite standard --model /path/to/model.gguf --out results/standard.jsonl
    kvsift bench run --suite standard --tasks niah --lengths 4096   # a suite narrowed by options

``methods=None`` means every registered method (``kvsift.methods.available_methods()``), resolved
by the caller (this module imports no engine code: the kvpress worker reads the suites too).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

STANDARD_TASKS = ("niah", "mk_niah", "mv_niah", "vt", "qa", "cwe", "ppl")


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    budgets: tuple[str, ...]
    samples: int
    depths: tuple[float, ...]
    methods: tuple[str, ...] | None = None  # None: every registered method
    seeds: tuple[int, ...] = (0,)
    ppl_tokens: int = 128
    doc: str = field(default="", compare=False)

    def narrowed(self, **kw) -> "Suite":
        """A copy with the given fields replaced (``None`` values keep the suite's)."""
        return replace(self, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items() if v is not None})


SUITES: dict[str, Suite] = {
    "standard": Suite(
        name="standard", tasks=STANDARD_TASKS, lengths=(4096, 8192, 16384, 30000),
        budgets=("0.02", "0.05", "0.1", "0.25"), samples=30, depths=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        ppl_tokens=64,
        doc="every task at 4k-30k tokens, every registered method at 2/5/10/25%, 30 samples per cell (greedy)"),
    "quick": Suite(
        name="quick", tasks=("niah", "mv_niah", "qa", "ppl"), lengths=(4096,), budgets=("0.05", "0.25"),
        samples=6, depths=(0.0, 0.5, 1.0), ppl_tokens=64,
        doc="sanity pass: 4 tasks at 4k, every registered method at 5/25%, 6 samples per cell"),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; available: {', '.join(SUITES)}")
    return SUITES[name]
