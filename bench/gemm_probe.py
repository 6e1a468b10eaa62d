"""How fast the step's projections run: each Qwen3-4B linear shape at a few batch sizes, separate and fused.

    python bench/gemm_probe.py --batch_sizes 1,16,64

Each case is 36 calls (one per layer, each on its own weight, as in a step) recorded in a CUDA
graph and replayed; µs per call and the weight bandwidth (GB/s of weights read) are printed for
torch's default BLAS backend and for the other one (`torch.backends.cuda.preferred_blas_library`).
Fused rows are the concatenated weights a fused projection reads in one call (q+k+v, gate+up).
"""

from __future__ import annotations

import click
import torch
import torch.nn.functional as F
from common import graph_seconds

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 2560, 32, 8, 128, 9728
SHAPES = {  # name -> (out features, in features)
    "q": (HEADS * HEAD_DIM, HIDDEN),
    "k or v": (KV_HEADS * HEAD_DIM, HIDDEN),
    "q+k+v fused": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    "o": (HIDDEN, HEADS * HEAD_DIM),
    "gate or up": (INTERMEDIATE, HIDDEN),
    "gate+up fused": (2 * INTERMEDIATE, HIDDEN),
    "down": (HIDDEN, INTERMEDIATE),
}
LAYERS = 36


@click.command()
@click.option("--batch_sizes", default="1,16,64", show_default=True)
def main(batch_sizes):
    device = torch.device("cuda")
    torch.manual_seed(0)
    backends = [torch.backends.cuda.preferred_blas_library()]
    other = {"cublas": "cublaslt", "cublaslt": "cublas"}.get(str(backends[0]).split(".")[-1].lower())
    print(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}; default BLAS {backends[0]}")
    print("\n| shape (out x in) | batch | backend | µs per call | weight GB/s |\n|---|---|---|---|---|")
    for name, (out_features, in_features) in SHAPES.items():
        weights = [torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02
                   for _ in range(LAYERS)]
        for batch in (int(b) for b in batch_sizes.split(",")):
            x = torch.randn(batch, 1, in_features, device=device, dtype=torch.bfloat16)
            for backend in (None, other):
                saved = torch.backends.cuda.preferred_blas_library()
                if backend:
                    torch.backends.cuda.preferred_blas_library(backend)
                try:
                    seconds = graph_seconds(lambda: [F.linear(x, w) for w in weights], 20)[0] / LAYERS
                finally:
                    torch.backends.cuda.preferred_blas_library(saved)
                gbps = out_features * in_features * 2 / seconds / 1e9
                print(f"| {name} ({out_features} x {in_features}) | {batch} | {backend or 'default'} | "
                      f"{seconds * 1e6:.1f} | {gbps:,.0f} |", flush=True)



if __name__ == "__main__":
    main()
