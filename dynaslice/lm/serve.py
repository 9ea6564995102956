"""One set of weights serving every budget: an elastic language model (issue 32, item 5).

:class:`ElasticLM` holds one :class:`~dynaslice.lm.supernet.LMSupernet` and a budget table (the
Pareto slices of :func:`dynaslice.lm.search.search`, in PSS's format). Each request names its
budget -- parameters, MACs per token or measured milliseconds per decoded token -- and the table
picks the slice of lowest validation perplexity within it. Switching budget is choosing an
arch: the slices are views of the same weights, so nothing is copied or loaded and the resident
memory stays that of the largest model (plus each request's KV cache)::

    from dynaslice.lm import ElasticLM

    lm = ElasticLM(net, "bench/out/lm_search.json")
    out = lm.generate(prompt_ids, 64, max_latency_ms=1.5)      # greedy, the table's slice
    out, stats = lm.speculative(prompt_ids, 64, draft=lm.arch(max_params=1e6), k=4)

Self-speculative decoding (:meth:`ElasticLM.speculative`): a narrow slice of the same weights
drafts ``k`` tokens greedily, the largest checks them in one forward over its KV cache and keeps
the longest prefix it would have generated itself, plus its own next token. The output is the
largest's greedy output token for token; what the draft changes is only how many forwards of the
largest that takes.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import runs, safejson
from ..onnx_package import pick_entry
from ..space import Arch
from .search import TABLE_FORMAT
from .supernet import KVCache, LMSupernet


@dataclass(frozen=True)
class SpeculativeStats:
    """What one :meth:`ElasticLM.speculative` call did: ``rounds`` forwards of the largest (each
    checking ``k`` drafted tokens), ``drafted`` tokens proposed, ``accepted`` of them kept."""

    rounds: int
    drafted: int
    accepted: int

    @property
    def acceptance(self) -> float:
        """The fraction of drafted tokens the largest kept."""
        return self.accepted / self.drafted if self.drafted else 0.0


def load_table(path: str | Path) -> list[dict[str, Any]]:
    """The entries of an LM budget table: a ``dynaslice-budget-table`` JSON file, a run directory
    holding one (``budget_table.json``, where a PSS run keeps its own), or a JSON file holding one
    under ``"budget_table"`` (what ``bench/bench_lm_search.py`` writes)."""
    path = Path(path)
    if path.is_dir():
        path = path / runs.BUDGET_TABLE
    try:
        d = safejson.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no budget table at {path}: dynaslice.lm.search writes one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(d, dict) and "budget_table" in d:
        d = d["budget_table"]
    if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT or not isinstance(d.get("entries"), list):
        raise ValueError(f"{path} is not a dynaslice budget table")
    return d["entries"]


class ElasticLM:
    """An LM supernet and its budget table: one set of weights, a slice per request.

    ``table``: the entries (dicts with ``arch``, ``params``, ``macs``, ``latency_ms`` and
    ``val_perplexity``, as :func:`dynaslice.lm.search.budget_table` writes them) or a path
    :func:`load_table` reads. Every entry's arch is validated against ``net`` here, once; ``net``
    is put in eval mode (serving runs no dropout).
    """

    def __init__(self, net: LMSupernet, table: Sequence[Mapping[str, Any]] | str | Path):
        entries = load_table(table) if isinstance(table, str | Path) else list(table)
        if not entries:
            raise ValueError("the budget table is empty")
        missing = [k for k in ("arch", "params", "macs", "val_perplexity") if k not in entries[0]]
        if missing:
            raise ValueError(
                f"budget table entries need {', '.join(missing)} (written by dynaslice.lm.search)"
            )
        self.net = net.eval()
        self.entries = [dict(e) for e in entries]
        self.archs = [net.space.validate(e["arch"]) for e in entries]
        self.largest = net.space.largest()

    # --- budgets -------------------------------------------------------------------------------
    def arch(
        self,
        max_params: float | None = None,
        max_macs: float | None = None,
        max_latency_ms: float | None = None,
    ) -> Arch:
        """The table's slice of lowest validation perplexity within every limit given (cheaper in
        MACs on a tie); the largest when none is given. Choosing is all a switch costs."""
        if max_params is None and max_macs is None and max_latency_ms is None:
            return self.largest
        if max_params is not None and (
            isinstance(max_params, bool)
            or not isinstance(max_params, numbers.Real)
            or max_params != max_params
        ):
            raise ValueError(f"max_params must be a number (e.g. 2e6) or None, got {max_params!r}")
        fits = [i for i, e in enumerate(self.entries) if max_params is None or e["params"] <= max_params]
        if not fits:
            cheapest = min(e["params"] for e in self.entries)
            raise ValueError(
                f"no slice of the budget table fits max_params={max_params:g}; the smallest has {cheapest}"
            )
        # PSS's one rule of budget switching (limits, refusals, the cheaper on a tie), ranking
        # language models by perplexity where it ranks classifiers by accuracy
        ranked = [{**self.entries[i], "val_accuracy": -self.entries[i]["val_perplexity"]} for i in fits]
        return self.archs[fits[pick_entry(ranked, max_macs, max_latency_ms)]]

    # --- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new_tokens: int, arch: Mapping[str, int] | None = None,
                 **budget: float | None) -> torch.Tensor:  # fmt: skip
        """Greedy decoding of ``new_tokens`` tokens after the prompt ``ids`` (``[1, tokens]``) by
        ``arch``, or by the table's slice for ``budget`` (:meth:`arch`'s keywords). Returns the
        prompt and the new tokens, ``[1, tokens + new_tokens]``."""
        arch = self._pick(arch, budget)
        ids = _prompt(ids, new_tokens)
        cache = KVCache(arch)
        logits = self.net.forward_cached(ids, arch, cache)
        out = [ids]
        for n in range(new_tokens):
            token = logits[:, -1:].argmax(-1)
            out.append(token)
            if n + 1 < new_tokens:
                logits = self.net.forward_cached(token, arch, cache)
        return torch.cat(out, dim=1)

    @torch.inference_mode()
    def speculative(
        self, ids: torch.Tensor, new_tokens: int, draft: Mapping[str, int], k: int = 4
    ) -> tuple[torch.Tensor, SpeculativeStats]:
        """The largest's greedy output (as :meth:`generate` with the largest), with slice
        ``draft`` proposing ``k`` tokens per forward of the largest.

        Both keep a KV cache of the committed tokens but the last; a round drafts ``k`` tokens,
        runs the largest once over the last committed token and the drafts, keeps the drafts up
        to the first one the largest would not have chosen, then the largest's own choice there
        (so every round commits at least one token), and truncates both caches to what was kept.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative decoding drafts k >= 1 tokens per round, got k={k!r}")
        draft = self.net.space.validate(draft)
        seq = _prompt(ids, new_tokens)
        target = len(seq[0]) + new_tokens
        big, small = KVCache(self.largest), KVCache(draft)
        if len(seq[0]) > 1:  # the prompt but its last token, into both caches
            self.net.forward_cached(seq[:, :-1], self.largest, big)
            self.net.forward_cached(seq[:, :-1], draft, small)
        rounds = drafted = accepted = 0
        while seq.shape[1] < target:
            want = min(k, target - seq.shape[1])
            proposal = self._draft(seq, draft, small, want)
            checked = self.net.forward_cached(torch.cat([seq[:, -1:], proposal], 1), self.largest, big)
            choice = checked.argmax(-1)  # the largest's token after the last committed and each draft
            agree = (choice[0, :want] == proposal[0]).long()
            m = int(agree.cumprod(0).sum())
            seq = torch.cat([seq, proposal[:, :m], choice[:, m : m + 1]], dim=1)
            big.truncate(seq.shape[1] - 1)
            small.truncate(min(small.length, seq.shape[1] - 1))
            rounds, drafted, accepted = rounds + 1, drafted + want, accepted + m
        return seq[:, :target], SpeculativeStats(rounds, drafted, accepted)

    def _draft(self, seq: torch.Tensor, arch: Arch, cache: KVCache, n: int) -> torch.Tensor:
        """``n`` greedy tokens of ``arch`` after ``seq``, feeding first what its cache lacks: the
        last committed token, and after a round that kept every draft, the last draft too (the
        draft never fed its own last token)."""
        tokens = []
        feed = seq[:, cache.length :]
        for _ in range(n):
            token = self.net.forward_cached(feed, arch, cache)[:, -1:].argmax(-1)
            tokens.append(token)
            feed = token
        return torch.cat(tokens, dim=1)

    def _pick(self, arch: Mapping[str, int] | None, budget: Mapping[str, float | None]) -> Arch:
        if arch is not None and any(v is not None for v in budget.values()):
            raise ValueError("give a request an arch or a budget, not both")
        unknown = set(budget) - {"max_params", "max_macs", "max_latency_ms"}
        if unknown:
            raise ValueError(f"unknown budget {sorted(unknown)}: use max_params, max_macs or max_latency_ms")
        return self.net.space.validate(arch) if arch is not None else self.arch(**budget)


def _prompt(ids: object, new_tokens: object) -> torch.Tensor:
    """``ids`` when it is one prompt ``[1, tokens]`` of token ids and ``new_tokens`` a count,
    else a one-line ValueError."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise ValueError(f"new_tokens must be an int >= 0, got {new_tokens!r}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"generation takes one prompt of token ids [1, tokens >= 1], got {got}")
    if ids.dtype != torch.long:
        raise ValueError(f"generation takes token ids of dtype torch.long, got {ids.dtype}")
    return ids
