"""Turning a last hidden state into the next input embedding for a latent step."""

from __future__ import annotations

import torch

from .models import LoadedModel


class LatentInput:
    """Maps final hidden states `[batch, hidden]` to input embeddings `[batch, hidden]`.

    With `realign`, h -> h W_a where W_a = (W_outᵀ W_out + 1e-5 I)⁻¹ W_outᵀ W_in
    (least squares from the output head's space back to the input-embedding
    space, solved once in fp32); without it, the identity. Either way the result
    is rescaled to the mean norm of the input embeddings.
    """

    RIDGE = 1e-5

    def __init__(self, lm: LoadedModel, realign: bool):
        w_in = lm.model.get_input_embeddings().weight.detach().float()  # [vocab, hidden]
        self.target_norm = w_in.norm(dim=1).mean()
        self.dtype = lm.dtype
        self.matrix: torch.Tensor | None = None
        if realign:
            w_out = lm.model.get_output_embeddings().weight.detach().float()  # [vocab, hidden]
            gram = w_out.T @ w_out + self.RIDGE * torch.eye(w_out.shape[1], device=w_out.device)
            self.matrix = torch.linalg.solve(gram, w_out.T @ w_in)  # [hidden, hidden]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.float()
        if self.matrix is not None:
            x = x @ self.matrix
        x = x * (self.target_norm / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return x.to(self.dtype)
