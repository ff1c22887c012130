"""Quest: query-aware page selection for decode.

Every ``page_size``-token page keeps the per-channel min and max of its keys; a page's score for
query ``q`` is ``sum_d max(q_d * min_d, q_d * max_d)``, an upper bound of ``q . k`` over the page.
Each (request, head) reads its top pages under a token budget; the page holding the current
token is always read. The min/max live beside the cache in ``PageSummaries``, folded in by
``update_page_summaries`` where K is written; without them the selector recomputes them (O(S)).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from headwise.kernels import decode_select
from headwise.kernels.decode_select import PageSummaries, update_page_summaries  # noqa: F401  (the plugin's hook)
from headwise.kernels.index import DecodeMode, DecodeSelection

from .base import DecodeInputs, DensityContext, PatternModel
from .plan_errors import invalid


class PageTopK(PatternModel):
    type: Literal["page_topk"] = "page_topk"
    page_size: int = Field(16, ge=1, description="tokens per page")
    budget: int = Field(1024, ge=1, description="tokens read per head and step (whole pages)")

    @model_validator(mode="after")
    def _budget_holds_a_page(self) -> "PageTopK":
        if self.budget < self.page_size:
            raise invalid(f"a budget of at least one page ({self.page_size} tokens)", f"budget {self.budget}")
        return self


def select_decode(p: PageTopK, inp: DecodeInputs) -> DecodeSelection:
    """Top pages from the summaries kept beside the cache (``inp.page_summaries``), or, when the
    caller keeps none, from min/max recomputed out of the cache (reads every key: the oracle)."""
    if inp.q is None or inp.k_cache is None:
        raise ValueError("page_topk needs q and the paged k_cache")
    dev = inp.seq_lens.device
    idx, count = decode_select.page_topk(inp.q, inp.k_cache, inp.block_table, inp.seq_lens, inp.kv_heads,
                                         p.page_size, p.budget // p.page_size, summary=inp.page_summaries,
                                         max_len=inp.max_seq_len)
    b, h = count.shape
    return DecodeSelection.uniform(b, h, DecodeMode.BLOCKS, indices=idx.to(dev), count=count.to(dev),
                                   block_size=p.page_size, device=dev)


def expected_decode_density(p: PageTopK, length: int, ctx: DensityContext = DensityContext()) -> float:
    return min(1.0, (p.budget // p.page_size) * p.page_size / max(1, length))
