"""The readout of latent steps: what the model itself would say next at each latent step.

For every latent step the LM head is applied to the final hidden state that became the
step's input (before realignment), and the softmax gives the model's own next-token
distribution there: its top-k token ids and probabilities and its entropy (nats). With
realignment, the vector actually fed is compared (cosine) with every input embedding and the
nearest one is kept. Everything runs on the device; the result is one small float64 tensor
per agent, so a single copy brings it to the host.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_width(top_k: int) -> int:
    """Values per latent step in `latent_readout`'s result: k ids, k probabilities, entropy, cosine, nearest id."""
    return 2 * top_k + 3


CHUNK_ELEMENTS = 1 << 24  # vocabulary-wide values per temporary: 64 MiB in fp32, whatever the batch


@torch.no_grad()
def latent_readout(lm, hidden_states: torch.Tensor, realigned: torch.Tensor | None, top_k: int,
                   embedding_norms: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, steps, hidden] hidden states (and realigned inputs, or None) -> [batch, steps, 2k + 3] float64.

    Per step: top-k token ids (most likely first), their probabilities, the entropy of the whole
    distribution (nats), the cosine between the realigned input and its nearest input embedding
    and that embedding's token id (both NaN without realignment).
    embedding_norms: [vocab] fp32 norms of the input embeddings (computed when not given).

    The steps go through the LM head a few rows at a time (CHUNK_ELEMENTS values per temporary),
    so the readout's memory does not grow with the batch: for 64 problems' 640 steps over Qwen3-4B's
    vocabulary, all at once (as before) grew the peak by 1,492 MiB on a CPU, in chunks by 141 MiB
    (`bench/readout_memory.py`).
    """
    batch, steps, hidden = hidden_states.shape
    rows = hidden_states.reshape(batch * steps, hidden)
    fed = realigned.reshape(batch * steps, hidden) if realigned is not None else None
    if fed is not None and embedding_norms is None:
        embedding_norms = lm.model.get_input_embeddings().weight.float().norm(dim=1)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    size = max(1, CHUNK_ELEMENTS // vocab)
    parts = [_readout_rows(lm, rows[i:i + size], None if fed is None else fed[i:i + size], top_k, embedding_norms)
             for i in range(0, batch * steps, size)]
    return torch.cat(parts, dim=0).reshape(batch, steps, packed_width(top_k))


def _readout_rows(lm, hidden_states: torch.Tensor, realigned: torch.Tensor | None, top_k: int,
                  embedding_norms: torch.Tensor | None) -> torch.Tensor:
    """`latent_readout` of rows: [n, hidden] (and [n, hidden] or None) -> [n, 2k + 3] float64.

    At most two [n, vocab] fp32 temporaries live at once (the products are taken in place)."""
    log_probs = torch.log_softmax(lm.model.get_output_embeddings()(hidden_states.to(lm.dtype)).float(), dim=-1)
    probs = log_probs.exp()  # [n, vocab]
    top_probs, top_ids = probs.topk(top_k, dim=-1)
    entropy = -log_probs.mul_(probs).nan_to_num_().sum(dim=-1, keepdim=True)
    del log_probs, probs
    nan = torch.full_like(entropy, float("nan"))
    cosine, nearest = nan, nan
    if realigned is not None:
        weight = lm.model.get_input_embeddings().weight  # [vocab, hidden]
        cosines = (realigned.to(weight.dtype) @ weight.T).float()  # [n, vocab] dot products, then cosines
        cosines.div_((embedding_norms * realigned.float().norm(dim=-1, keepdim=True)).clamp_min(1e-12))
        best, best_id = cosines.max(dim=-1, keepdim=True)
        cosine, nearest = best, best_id.float()
    parts = [top_ids.double(), top_probs.double(), entropy.double(), cosine.double(), nearest.double()]
    return torch.cat(parts, dim=-1)


def unpack(packed: np.ndarray, top_k: int) -> dict:
    """`latent_readout`'s result on the host [..., 2k + 3] -> named arrays.

    ids [..., k] int64, probs [..., k] float32, entropy / cosine [...] float32, nearest [...] int64 (-1: none).
    """
    ids = packed[..., :top_k].astype(np.int64)
    probs = packed[..., top_k:2 * top_k].astype(np.float32)
    entropy = packed[..., 2 * top_k].astype(np.float32)
    cosine = packed[..., 2 * top_k + 1].astype(np.float32)
    nearest_raw = packed[..., 2 * top_k + 2]
    nearest = np.where(np.isnan(nearest_raw), -1, np.nan_to_num(nearest_raw)).astype(np.int64)
    return {"ids": ids, "probs": probs, "entropy": entropy, "cosine": cosine, "nearest": nearest}
