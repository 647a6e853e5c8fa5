"""Long-context tasks, deterministic in ``(task, length, seed)`` and sized in tokens of the model's
tokenizer.

* ``niah``      single needle (a magic number) over a grid of depths, RULER/NIAH style
* ``mk_niah``   several needles with different keys, one is asked for (the others distract)
* ``mv_niah``   one key with several values, all must be returned
* ``vt``        variable tracking: follow ``VAR A = 12345. VAR B = VAR A.`` chains
* ``cwe``       common-words extraction from a long numbered word list
* ``qa``        question answering over synthetic biographies with distractor paragraphs
* ``ppl``       long-text perplexity: prefill a context, teacher-force the continuation

Haystack filler and the perplexity text come from the shipped public-domain text
(:mod:`kvsift.eval.data`). A :class:`Sample` carries the parts of the prompt and the rendered
prompt (the tokenizer's chat template when it has one); ``prompt_tokens`` is the exact token
count of that rendering, at most ``length`` and within a sentence or so of it.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvsift.eval.data import PPL_TEXT, Filler, Tokenizer, count_tokens, load_ppl_text, load_text, ppl_texts

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
METRICS = ("any", "all", "ppl")


@dataclass(slots=True)
class Sample:
    """One prompt with its reference answers. For ``ppl`` samples the prompt parts are empty and
    ``context_ids`` / ``continuation_ids`` hold the token ids to prefill / to score."""

    task: str
    sample_id: str
    length: int
    seed: int
    instruction: str
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""
    prompt_tokens: int = 0
    context_ids: list[int] | None = None
    continuation_ids: list[int] | None = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        return cls(**d)


def render_prompt(tokenizer: Tokenizer, instruction: str, context: str, question: str,
                  answer_prefix: str) -> str:
    """The full prompt text: one user turn ``instruction / context / question`` in the tokenizer's
    chat template (when it has one), then the assistant's answer prefix."""
    user = "\n\n".join(p for p in (instruction, context, question) if p)
    template = getattr(tokenizer, "chat_template", None)
    if template and hasattr(tokenizer, "apply_chat_template"):
        head = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        head = user + "\n\n"
    return head + answer_prefix


def split_context_question(tokenizer: Tokenizer, sample: "Sample") -> tuple[list[int], list[int]]:
    """Token ids ``(context_ids, question_ids)`` of a generation sample, for the query-agnostic
    setting (``--compress context``): compress the context once, then answer the question over it.

    ``context_ids`` is the rendered prompt (``sample.prompt``: chat template, instruction, context)
    up to the end of the sample's context text; ``question_ids`` the rest (the question, the end of
    the user turn, the assistant opener and the answer prefix). The two text parts are encoded
    separately (``add_special_tokens=False``, as the runner encodes whole prompts) and their
    concatenation is the prompt, so every backend gets exactly these ids; at the cut the tokens may
    differ from the whole prompt's encoding (a BPE merge across it is lost), so ``len(context_ids) +
    len(question_ids)`` can differ from ``sample.prompt_tokens`` by a token or so: the runner uses
    the sum as the sample's prompt length. Raises ``ValueError`` for ``ppl`` samples (already split:
    ``context_ids`` / ``continuation_ids``) and when the context text is not found in the prompt."""
    if sample.metric == "ppl" or not sample.context:
        raise ValueError(f"sample {sample.sample_id!r} has no context text to split off")
    prompt = sample.prompt or render_prompt(tokenizer, sample.instruction, sample.context, sample.question,
                                            sample.answer_prefix)
    start = prompt.find(sample.context, prompt.find(sample.instruction) + len(sample.instruction)
                        if sample.instruction and sample.instruction in prompt else 0)
    if start < 0:
        raise ValueError(f"sample {sample.sample_id!r}: its context text is not in the rendered prompt "
                         f"(a chat template that rewrites the user turn?)")
    end = start + len(sample.context)
    context_ids = list(tokenizer.encode(prompt[:end], add_special_tokens=False))
    question_ids = list(tokenizer.encode(prompt[end:], add_special_tokens=False))
    if not context_ids or not question_ids:
        raise ValueError(f"sample {sample.sample_id!r}: empty context or question part")
    return context_ids, question_ids


# ----------------------------------------------------------------------------------------------
# building blocks

_ADJ = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
        "lucky", "misty", "noble", "olive", "proud", "quiet", "rusty", "silent", "tidy", "urban", "vivid",
        "wild", "young", "zesty", "bold", "crimson", "distant", "golden", "humble")
_NOUN = ("falcon", "harbor", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river",
         "saddle", "thistle", "umbrella", "valley", "walrus", "willow", "anchor", "beacon", "candle",
         "dolphin", "ember", "fountain", "glacier", "hedgehog", "island", "juniper", "kettle", "lighthouse",
         "mirror", "nutmeg", "otter")
_FIRST = ("Agnes", "Bertram", "Clara", "Desmond", "Edith", "Florian", "Greta", "Horace", "Ida", "Jasper",
          "Katrin", "Leopold", "Mabel", "Nolan", "Ottilie", "Percival", "Rosalind", "Silas", "Theodora",
          "Ulric", "Violet", "Wilfred", "Yvette", "Zachary")
_LAST = ("Ashdown", "Blackwood", "Carrow", "Dunmore", "Ellery", "Fairweather", "Greenhalgh", "Hartley",
         "Ingram", "Jessop", "Kingsley", "Lockwood", "Merriman", "Northcott", "Oakes", "Pemberton",
         "Quill", "Redfern", "Stroud", "Thorne", "Underhill", "Vance", "Whitlock", "Yardley")
_TOWNS = ("Ambleford", "Barrowmere", "Caldwick", "Dunhollow", "Eastbridge", "Fernleigh", "Glenmarsh",
          "Hollowell", "Ivybrook", "Kestrel Bay", "Larkhaven", "Millbrook", "Northwold", "Oakhurst",
          "Pennyfield", "Ravenscar", "Saltmarsh", "Thornbury", "Upton Vale", "Westmere", "Yarrowby",
          "Brindlecombe", "Copperstone", "Dovercliff", "Elderglen", "Foxmoor")
_JOBS = ("clockmaker", "botanist", "cartographer", "violinist", "glassblower", "lighthouse keeper",
         "bookbinder", "astronomer", "beekeeper", "shipwright", "schoolteacher", "apothecary")


def _rng(*parts: Any) -> random.Random:
    """A generator seeded by a string: stable across processes and Python hash seeds."""
    return random.Random(":".join(str(p) for p in parts))


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        k = f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
        if k not in taken:
            taken.add(k)
            return k


def _number(rng: random.Random, taken: set[str], digits: int = 7) -> str:
    while True:
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in taken:
            taken.add(v)
            return v


def insert_at_depths(sentences: list[str], counts: list[int], items: list[tuple[float, str]]) -> list[str]:
    """Insert each ``(depth, text)`` between sentences at the boundary where the fraction of
    filler tokens before it is closest to ``depth`` in [0, 1]. Items at equal depth keep order."""
    total = sum(counts)
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    slots: list[tuple[int, int, str]] = []
    for order, (depth, text) in enumerate(items):
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        target = depth * total
        idx = min(range(len(cum)), key=lambda i: (abs(cum[i] - target), i))
        slots.append((idx, order, text))
    out = list(sentences)
    for idx, _, text in sorted(slots, key=lambda s: (s[0], s[1]), reverse=True):
        out.insert(idx, text)
    return out


def _fit(length: int, compose: Callable[[int], Sample], tokenizer: Tokenizer, hi: int | None = None) -> Sample:
    """Largest ``budget`` whose rendered sample has at most ``length`` prompt tokens (binary
    search; ``compose`` must grow monotonically with its budget)."""
    def measured(b: int) -> Sample:
        s = compose(b)
        s.prompt = render_prompt(tokenizer, s.instruction, s.context, s.question, s.answer_prefix)
        s.prompt_tokens = count_tokens(tokenizer, s.prompt)
        return s

    lo, hi = 0, length if hi is None else hi
    best = measured(0)
    if best.prompt_tokens > length:
        raise ValueError(f"length {length} is too short for task {best.task!r}: the prompt without "
                         f"filler already has {best.prompt_tokens} tokens")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        s = measured(mid)
        if s.prompt_tokens <= length:
            lo, best = mid, s
        else:
            hi = mid - 1
    return best


# ----------------------------------------------------------------------------------------------
# tasks


class TaskUnavailable(ValueError):
    """A cell this task cannot build with the data at hand (e.g. ``ppl`` longer than the shipped
    text): the runner skips it without recording an error."""


@dataclass(slots=True)
class TaskConfig:
    """Options shared by the task builders.

    ``samples``: samples per cell for every task. ``None`` keeps the old defaults: one NIAH sample
    per depth of ``depths``, 2 samples for the other tasks. With ``samples = N`` NIAH cycles
    through the depth grid (sample ``i`` sits at ``depths[i % len(depths)]``, repeat
    ``i // len(depths)`` with its own key, number and filler offset)."""

    depths: tuple[float, ...] = DEFAULT_DEPTHS   # niah
    samples: int | None = None                   # samples per cell (None: one per depth for niah, 2 for others)
    num_needles: int = 4                         # mk_niah keys / mv_niah values
    num_hops: int = 4                            # vt chain length
    num_common: int = 10                         # cwe
    ppl_tokens: int = 128                        # ppl: teacher-forced continuation length
    ppl_text: str | None = None                  # ppl: "alice", a shipped file or a .txt path (None: "alice", or
                                                 # the builder's own filler text when it was given one)

    def __post_init__(self):
        self.depths = tuple(float(d) for d in self.depths)
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be a non-empty list of values in [0, 1], got {self.depths}")
        for name in ("samples", "num_needles", "num_hops", "num_common", "ppl_tokens"):
            v = getattr(self, name)
            if v is None and name == "samples":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.ppl_text is not None and self.ppl_text not in ppl_texts() \
                and not Path(self.ppl_text).expanduser().is_file():
            raise ValueError(f"ppl_text {self.ppl_text!r} is neither a shipped text ({', '.join(ppl_texts())}) "
                             f"nor a file")

    def n_samples(self, task: str) -> int:
        """How many samples a cell of ``task`` has."""
        if self.samples is not None:
            return self.samples
        return len(self.depths) if task == "niah" else 2


class TaskBuilder:
    """Builds the samples of one cell ``(task, length, seed)`` for a tokenizer."""

    def __init__(self, tokenizer: Tokenizer, config: TaskConfig | None = None, text: str | None = None):
        self.tok = tokenizer
        self.cfg = config or TaskConfig()
        self.filler = Filler(tokenizer, text)
        self._text = text
        self._text_ids: list[int] | None = None

    def build(self, task: str, length: int, seed: int) -> list[Sample]:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; available: {sorted(TASKS)}")
        if not isinstance(length, int) or length < 16:
            raise ValueError(f"length must be an integer >= 16 tokens, got {length!r}")
        return TASKS[task](self, length, seed)

    # -- helpers
    def _haystack(self, budget: int, start: int, items: list[tuple[float, str]]) -> str:
        needle_tokens = sum(count_tokens(self.tok, " " + t) for _, t in items)
        sents, counts = self.filler.take(budget - needle_tokens, start)
        return " ".join(insert_at_depths(sents, counts, items))

    # -- builders
    def niah(self, length: int, seed: int) -> list[Sample]:
        out = []
        depths = self.cfg.depths
        for i in range(self.cfg.n_samples("niah")):
            depth, rep = depths[i % len(depths)], i // len(depths)
            # the first pass over the grid keeps the seeds (and sample ids) of one-sample-per-depth runs
            rng = _rng("niah", length, seed, depth) if rep == 0 else _rng("niah", length, seed, depth, rep)
            key, value = _key(rng, set()), _number(rng, set())
            start = rng.randrange(len(self.filler))
            needle = f"One of the special magic numbers for {key} is: {value}."

            sid = f"niah/L{length}/s{seed}/d{depth:g}" + (f"/r{rep}" if rep else "")

            def compose(b: int, depth=depth, key=key, value=value, start=start, needle=needle, sid=sid,
                        rep=rep) -> Sample:
                return Sample(
                    task="niah", sample_id=sid, length=length, seed=seed,
                    instruction=("A special magic number is hidden within the following text. Make sure to "
                                 "memorize it. I will quiz you about it afterwards."),
                    context=self._haystack(b, start, [(depth, needle)]),
                    question=f"What is the special magic number for {key} mentioned in the provided text?",
                    answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
                    answers=[value], metric="any", max_new_tokens=16,
                    meta={"depth": depth, "repeat": rep, "key": key, "needle": needle})
            out.append(_fit(length, compose, self.tok))
        return out

    def mk_niah(self, length: int, seed: int) -> list[Sample]:
        out = []
        for i in range(self.cfg.n_samples("mk_niah")):
            rng = _rng("mk_niah", length, seed, i)
            keys, vals = set(), set()
            pairs = [(_key(rng, keys), _number(rng, vals)) for _ in range(self.cfg.num_needles)]
            depths = [rng.random() for _ in pairs]
            qk, qv = pairs[rng.randrange(len(pairs))]
            start = rng.randrange(len(self.filler))
            items = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, (k, v) in zip(depths, pairs)]

            def compose(b: int, i=i, items=items, qk=qk, qv=qv, start=start) -> Sample:
                return Sample(
                    task="mk_niah", sample_id=f"mk_niah/L{length}/s{seed}/i{i}", length=length, seed=seed,
                    instruction=("Some special magic numbers are hidden within the following text. Make sure "
                                 "to memorize them. I will quiz you about one of them afterwards."),
                    context=self._haystack(b, start, items),
                    question=f"What is the special magic number for {qk} mentioned in the provided text?",
                    answer_prefix=f"The special magic number for {qk} mentioned in the provided text is",
                    answers=[qv], metric="any", max_new_tokens=16,
                    meta={"key": qk, "depths": depths, "distractor_keys": [k for k, _ in pairs if k != qk]})
            out.append(_fit(length, compose, self.tok))
        return out

    def mv_niah(self, length: int, seed: int) -> list[Sample]:
        out = []
        for i in range(self.cfg.n_samples("mv_niah")):
            rng = _rng("mv_niah", length, seed, i)
            key, vals = _key(rng, set()), set()
            values = [_number(rng, vals) for _ in range(self.cfg.num_needles)]
            depths = sorted(rng.random() for _ in values)
            start = rng.randrange(len(self.filler))
            items = [(d, f"One of the special magic numbers for {key} is: {v}.") for d, v in zip(depths, values)]

            def compose(b: int, i=i, items=items, key=key, values=values, start=start) -> Sample:
                return Sample(
                    task="mv_niah", sample_id=f"mv_niah/L{length}/s{seed}/i{i}", length=length, seed=seed,
                    instruction=("Some special magic numbers are hidden within the following text. Make sure "
                                 "to memorize them. I will quiz you about them afterwards."),
                    context=self._haystack(b, start, items),
                    question=f"What are all the special magic numbers for {key} mentioned in the provided text?",
                    answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are",
                    answers=list(values), metric="all", max_new_tokens=12 * len(values),
                    meta={"key": key, "depths": depths})
            out.append(_fit(length, compose, self.tok))
        return out

    def vt(self, length: int, seed: int) -> list[Sample]:
        out = []
        for i in range(self.cfg.n_samples("vt")):
            rng = _rng("vt", length, seed, i)
            names: set[str] = set()

            def var() -> str:
                while True:
                    v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
                    if v not in names:
                        names.add(v)
                        return v

            nums: set[str] = set()
            value, other = _number(rng, nums, 5), _number(rng, nums, 5)
            chain = [var() for _ in range(self.cfg.num_hops)]
            decoy = [var() for _ in range(self.cfg.num_hops)]
            items = []
            for vars_, val in ((chain, value), (decoy, other)):
                depths = sorted(rng.random() for _ in vars_)
                stmts = [f"VAR {vars_[0]} = {val}."] + [f"VAR {b} = VAR {a}." for a, b in zip(vars_, vars_[1:])]
                items += list(zip(depths, stmts))
            start = rng.randrange(len(self.filler))
            n = len(chain)

            def compose(b: int, i=i, items=items, chain=chain, value=value, start=start, n=n) -> Sample:
                return Sample(
                    task="vt", sample_id=f"vt/L{length}/s{seed}/i{i}", length=length, seed=seed,
                    instruction=("Memorize and track the chain(s) of variable assignment hidden in the "
                                 "following text."),
                    context=self._haystack(b, start, items),
                    question=f"Find all variables that are assigned the value {value} in the text above.",
                    answer_prefix=(f"Answer: According to the chain(s) of variable assignment in the text above, "
                                   f"{n} variables are assigned the value {value}, they are:"),
                    answers=list(chain), metric="all", max_new_tokens=8 * n,
                    meta={"value": value, "decoy": decoy})
            out.append(_fit(length, compose, self.tok))
        return out

    def cwe(self, length: int, seed: int) -> list[Sample]:
        vocab = sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{4,10}\b", load_text() if self._text is None
                                                       else self._text)})
        if len(vocab) < 2 * self.cfg.num_common:
            raise ValueError("cwe needs a text with more distinct words")
        out = []
        for i in range(self.cfg.n_samples("cwe")):
            rng = _rng("cwe", length, seed, i)
            words = list(vocab)
            rng.shuffle(words)
            common, rare = words[:self.cfg.num_common], words[self.cfg.num_common:]
            order_seed = rng.random()
            k = self.cfg.num_common

            def compose(n_entries: int, i=i, common=common, rare=rare, order_seed=order_seed, k=k) -> Sample:
                # common words fill ~30% of the list (each at least 3 times more often than a rare
                # word, which appears twice); rare words fill the rest
                f_common = max(6, round(0.3 * n_entries / k))
                n_rare = max(0, (n_entries - f_common * k) // 2)
                entries = [w for w in common for _ in range(f_common)]
                entries += [rare[j % len(rare)] for j in range(n_rare) for _ in range(2)]
                random.Random(order_seed).shuffle(entries)
                return Sample(
                    task="cwe", sample_id=f"cwe/L{length}/s{seed}/i{i}", length=length, seed=seed,
                    instruction=("Below is a numbered list of words. In these words, some appear more often "
                                 "than others. Memorize the ones that appear most often."),
                    context="\n".join(f"{j + 1}. {w}" for j, w in enumerate(entries)),
                    question=f"What are the {k} most common words in the above list?",
                    answer_prefix=f"Answer: The top {k} words that appear most often in the list are:",
                    answers=list(common), metric="all", max_new_tokens=6 * k,
                    meta={"common_freq": f_common, "entries": len(entries)})
            out.append(_fit(length, compose, self.tok, hi=length))
        return out

    def qa(self, length: int, seed: int) -> list[Sample]:
        out = []
        for i in range(self.cfg.n_samples("qa")):
            rng = _rng("qa", length, seed, i)
            firsts, lasts, towns = list(_FIRST), list(_LAST), list(_TOWNS)
            for names in (firsts, lasts, towns):
                rng.shuffle(names)
            people = [(firsts[0], lasts[0]), (firsts[1], lasts[0]), (firsts[0], lasts[1]),
                      (firsts[2], lasts[2]), (firsts[3], lasts[3]), (firsts[4], lasts[4])]
            paras = []
            for j, (fn, ln) in enumerate(people):
                born, moved = towns[2 * j], towns[2 * j + 1]
                paras.append((f"{fn} {ln}", born, f"{fn} {ln}, a {rng.choice(_JOBS)}, was born in the town of "
                              f"{born} and later settled in {moved}, where {fn} lived for many years."))
            gold_name, gold_town, _ = paras[0]
            depths = [rng.random() for _ in paras]
            items = [(d, p[2]) for d, p in zip(depths, paras)]
            start = rng.randrange(len(self.filler))

            def compose(b: int, i=i, items=items, gold_name=gold_name, gold_town=gold_town, start=start,
                        paras=paras) -> Sample:
                return Sample(
                    task="qa", sample_id=f"qa/L{length}/s{seed}/i{i}", length=length, seed=seed,
                    instruction=("Answer the question based on the biographies hidden in the following text. "
                                 "Only give the answer."),
                    context=self._haystack(b, start, items),
                    question=f"Question: In which town was {gold_name} born?",
                    answer_prefix="Answer:",
                    answers=[gold_town], metric="any", max_new_tokens=12,
                    meta={"name": gold_name, "distractor_towns": [p[1] for p in paras[1:]], "depth": depths[0]})
            out.append(_fit(length, compose, self.tok))
        return out

    @property
    def ppl_text(self) -> str:
        """The perplexity text's name, written into every ppl row (``settings.ppl_text``): a row made on
        another text is not this cell (the runner runs it again). ``"filler"`` when the builder was
        given its own text and no ``ppl_text``."""
        if self.cfg.ppl_text is not None:
            return self.cfg.ppl_text
        return PPL_TEXT if self._text is None else "filler"

    def ppl_text_ids(self) -> list[int]:
        """Token ids of the perplexity text (:attr:`ppl_text`)."""
        if self._text_ids is None:
            name = self.ppl_text
            if self.cfg.ppl_text is None and self._text is not None:   # "filler"
                text = self._text
            elif name in ppl_texts():
                text = load_ppl_text(name)
            else:
                path = Path(name).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"ppl text {name!r} is neither a shipped text ({ppl_texts()}) "
                                            f"nor a file")
                text = path.read_text(encoding="utf-8")
            self._text_ids = self.tok.encode(text, add_special_tokens=False)
        return self._text_ids

    def max_length(self, task: str) -> int | None:
        """The longest context ``task`` supports with the data at hand (None: no limit)."""
        return len(self.ppl_text_ids()) - self.cfg.ppl_tokens if task == "ppl" else None

    def ppl(self, length: int, seed: int) -> list[Sample]:
        ids, n_cont = self.ppl_text_ids(), self.cfg.ppl_tokens
        if length + n_cont > len(ids):
            raise TaskUnavailable(f"ppl: the text has {len(ids)} tokens, too few for a {length}-token context "
                                  f"plus {n_cont} scored tokens (without repeating the text); give a longer "
                                  f"one with --ppl-text")
        out = []
        for i in range(self.cfg.n_samples("ppl")):
            rng = _rng("ppl", length, seed, i)
            start = rng.randrange(0, len(ids) - length - n_cont + 1)
            out.append(Sample(
                task="ppl", sample_id=f"ppl/L{length}/s{seed}/i{i}", length=length, seed=seed, instruction="",
                context="", question="", answer_prefix="", answers=[], metric="ppl", max_new_tokens=0,
                meta={"start": start, "text": self.ppl_text}, prompt_tokens=length,
                context_ids=list(ids[start:start + length]),
                continuation_ids=list(ids[start + length:start + length + n_cont])))
        return out


TASKS: dict[str, Callable[[TaskBuilder, int, int], list[Sample]]] = {
    "niah": TaskBuilder.niah,
    "mk_niah": TaskBuilder.mk_niah,
    "mv_niah": TaskBuilder.mv_niah,
    "vt": TaskBuilder.vt,
    "cwe": TaskBuilder.cwe,
    "qa": TaskBuilder.qa,
    "ppl": TaskBuilder.ppl,
}

TASK_DOCS = {
    "niah": "single needle (a 7-digit magic number), samples cycling over the depth grid",
    "mk_niah": "multi-key NIAH: several keys with numbers, one is asked for",
    "mv_niah": "multi-value NIAH: one key with several numbers, all must be returned",
    "vt": "variable tracking: list every variable of a VAR A = 12345 / VAR B = VAR A chain",
    "cwe": "common-words extraction: the most frequent words of a long numbered list",
    "qa": "QA over synthetic biographies with distractor paragraphs (in which town was X born?)",
    "ppl": "perplexity of a teacher-forced continuation of the shipped text over the compressed cache",
}

def check_task_names(names) -> None:
    """A ``ValueError`` naming every one of ``names`` that is not a task, with the tasks there are."""
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {', '.join(bad)}; available: {', '.join(sorted(TASKS))}")


RULER_TASKS = ("mk_niah", "mv_niah", "vt", "cwe", "qa")
