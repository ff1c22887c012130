"""Quest: query-aware page selection for decode.

Every ``page_size``-token page keeps the per-channel min and max of its keys; a page's score for
query ``q`` is ``sum_d max(q_d * min_d, q_d * max_d)``, an upper bound of ``q . k`` over the page.
Each (request, head) reads its top pages under a token budget; the page holding the current
token is always read. (The torch version recomputes min/max from the cache each step; a real
deployment keeps them beside the cache.)
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from headwise.kernels import estimate
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
    if inp.q is None or inp.k_cache is None:
        raise ValueError("page_topk needs q and the paged k_cache")
    dev = inp.seq_lens.device
    kmin, kmax = estimate.page_min_max(inp.k_cache, inp.block_table, inp.seq_lens, p.page_size)
    scores = estimate.page_scores(inp.q, kmin, kmax, inp.kv_heads)  # [B, H, P]
    lens = inp.seq_lens.to(scores.device).long().view(-1, 1, 1)
    page = torch.arange(scores.shape[-1], device=scores.device).view(1, 1, -1)
    n_pages = (lens + p.page_size - 1) // p.page_size
    keep, _ = estimate.topk_forced(scores, p.budget // p.page_size, forced=page == n_pages - 1,
                                   allowed=page < n_pages)
    idx = torch.sort(torch.where(keep, page, 2**31 - 1), dim=-1).values  # kept pages first, ascending
    count = keep.sum(-1)
    width = max(1, int(count.max().item()))
    idx = torch.where(torch.arange(width, device=idx.device) < count[..., None], idx[..., :width], 0)
    b, h = scores.shape[:2]
    return DecodeSelection.uniform(b, h, DecodeMode.BLOCKS, indices=idx.to(dev), count=count.to(dev),
                                   block_size=p.page_size, device=dev)


def expected_decode_density(p: PageTopK, length: int, ctx: DensityContext = DensityContext()) -> float:
    return min(1.0, (p.budget // p.page_size) * p.page_size / max(1, length))
