"""The sequential recommender (SASRec-style), shared by training and the server.

A causal transformer reads a user's recent items (oldest first) and its last hidden state is the
user vector. Item vectors live in the same space: the input embedding of an item is also its output
embedding (tied), so `user_vector @ item_vectors.T` scores every item and FAISS can retrieve them.

An item's vector is the sum of up to three parts:
- a learned id embedding (zero for items nobody has interacted with yet, and for items added live);
- a projection of its text vector (the catalog encoder's embedding of its title), when items have
  text, so a new item is recommendable before anyone bought it;
- the mean of its attribute embeddings (brand / category ids), when the data has attributes.

Training computes the table from the parts; the bundle stores the finished table plus the text
projection, so the server only needs `SeqEncoder` and, for live items, `project_text`.
Row 0 of the table is padding.
"""
from __future__ import annotations

import math

import torch
from torch import nn


# How many of a user's latest items the re-scoring features read (the model reads its own max_len).
HISTORY_CAP = 300


class SeqEncoder(nn.Module):
    """Positional embedding + causal transformer blocks over an item table -> user vectors."""

    def __init__(self, dims: int, max_len: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.dims, self.max_len, self.heads = dims, max_len, heads
        self.pos = nn.Embedding(max_len, dims)
        self.drop = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(dims, heads, dim_feedforward=dims * 4 if dims < 128 else dims * 2,
                                           dropout=dropout, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dims)

    def hidden(self, seqs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """seqs (B, L) item rows, left-padded with 0 -> hidden states (B, L, d)."""
        length = seqs.shape[1]
        x = table[seqs] * math.sqrt(self.dims)
        pos = torch.arange(self.max_len - length, self.max_len, device=seqs.device)
        x = self.drop(x + self.pos(pos)[None])
        pad = seqs == 0
        x = x * (~pad)[..., None]
        # Causal attention that also ignores padding keys; every position may attend to itself so no
        # row is fully masked (a fully masked row gives NaN, and NaN leaks through later layers).
        idx = torch.arange(length, device=seqs.device)
        allowed = (idx[None, :] <= idx[:, None])[None] & ~pad[:, None, :]
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=seqs.device)[None]
        mask = ~allowed.repeat_interleave(self.heads, dim=0)
        h = self.blocks(x, mask=mask)
        return self.norm(h)

    def user_vectors(self, seqs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """seqs (B, L) left-padded -> the hidden state at the last position (B, d)."""
        return self.hidden(seqs, table)[:, -1]


class SeqRec(nn.Module):
    """The trainable model: item-table parts + SeqEncoder."""

    def __init__(self, n_items: int, dims: int = 64, max_len: int = 50, layers: int = 2, heads: int = 2,
                 dropout: float = 0.3, text: torch.Tensor | None = None, attrs: torch.Tensor | None = None,
                 n_attrs: int = 0) -> None:
        super().__init__()
        self.n_items = n_items
        self.item = nn.Embedding(n_items + 1, dims, padding_idx=0)
        nn.init.normal_(self.item.weight, std=0.02)
        with torch.no_grad():
            self.item.weight[0].zero_()
        # text: (n_items+1, t) float; attrs: (n_items+1, A) long, 0-padded attribute ids (1-based).
        self.register_buffer("text", text if text is not None else torch.zeros(0), persistent=False)
        self.register_buffer("attrs", attrs if attrs is not None else torch.zeros(0, dtype=torch.long),
                             persistent=False)
        self.text_proj = nn.Linear(text.shape[1], dims, bias=False) if text is not None else None
        self.attr = nn.Embedding(n_attrs + 1, dims, padding_idx=0) if attrs is not None else None
        if self.attr is not None:
            nn.init.normal_(self.attr.weight, std=0.02)
            with torch.no_grad():
                self.attr.weight[0].zero_()
        self.encoder = SeqEncoder(dims, max_len, layers, heads, dropout)

    def table(self) -> torch.Tensor:
        """The item table (n_items+1, d): id + text + attribute parts; row 0 stays zero."""
        t = self.item.weight
        if self.text_proj is not None:
            t = t + self.text_proj(self.text)
        if self.attr is not None:
            emb = self.attr(self.attrs)  # (N, A, d); padding rows are zero
            count = (self.attrs > 0).sum(1, keepdim=True).clamp(min=1)
            t = t + emb.sum(1) / count
        mask = torch.ones(t.shape[0], 1, device=t.device)
        mask[0] = 0
        return t * mask


def left_pad(seqs: list[list[int]], max_len: int) -> torch.Tensor:
    """Lists of item rows (oldest first) -> (B, L) long tensor, left-padded, L = longest kept length."""
    kept = [s[-max_len:] for s in seqs]
    length = max(1, max((len(s) for s in kept), default=1))
    out = torch.zeros(len(kept), length, dtype=torch.long)
    for i, s in enumerate(kept):
        if s:
            out[i, length - len(s):] = torch.as_tensor(s, dtype=torch.long)
    return out
