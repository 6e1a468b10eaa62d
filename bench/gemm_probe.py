"""How fast the step's projections run: each Qwen3-4B linear shape at a few batch sizes, separate and fused.

    python bench/gemm_probe.py --batch_sizes 1,16,64
    python bench/gemm_probe.py --batch_sizes 1,4,16 --skinny   # and latentmas.kernels.skinny_linear, with a sweep of its tiles
    python bench/gemm_probe.py --batch_sizes 1,4 --split_k 2,4,8   # and cuBLAS's batched product over slices of K

Each case is 36 calls (one per layer, each on its own weight, as in a step) recorded in a CUDA
graph and replayed; µs per call and the weight bandwidth (GB/s of weights read) are printed for
torch's default BLAS backend and for the other one (`torch.backends.cuda.preferred_blas_library`).
Fused rows are the concatenated weights a fused projection reads in one call (q+k+v, gate+up).
"""

from __future__ import annotations

import click
import torch
import torch.nn.functional as F
import triton
from common import graph_seconds

from latentmas.kernels.skinny_linear import MAX_ROWS, Plan, _skinny_linear_triton, plan
from latentmas.kernels.split_k import fitting_splits, split_k_partials

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


SWEEP = [Plan(n, k, split, warps, stages) for n in (16, 32, 64) for k in (128, 256, 512) for split in (1, 2, 4, 8)
         for warps in (4, 8) for stages in (3, 4)]


def skinny_rows(name, weights, x, cublas_seconds):
    """Rows for latentmas' skinny_linear: the tiles `plan` picks, and the best three of SWEEP."""
    out_features, in_features = weights[0].shape
    gigabytes = out_features * in_features * 2 / 1e9
    timed = []
    for tiles in [None, *SWEEP]:
        try:
            seconds = graph_seconds(lambda: [_skinny_linear_triton(x, w, None, tiles) for w in weights], 20)[0] / LAYERS
        except triton.runtime.errors.OutOfResources as error:  # a tile that does not fit (shared memory, registers)
            print(f"  ({tiles}: {type(error).__name__})")
            continue
        timed.append((seconds, tiles))
    chosen = timed[0][0]
    print(f"| {name} | {x.shape[0]} | skinny, plan {tuple(plan(*x.shape[:1], out_features, in_features))} | "
          f"{chosen * 1e6:.1f} | {gigabytes / chosen:,.0f} | {cublas_seconds / chosen:.2f}x |")
    for seconds, tiles in sorted(timed[1:])[:3]:
        print(f"| {name} | {x.shape[0]} | skinny {tuple(tiles)} | {seconds * 1e6:.1f} | {gigabytes / seconds:,.0f} | "
              f"{cublas_seconds / seconds:.2f}x |", flush=True)


def split_k_rows(name, weights, x, cublas_seconds, counts):
    """Rows for `kernels.split_k`: its fp32 partials alone (the step sums them in the next fused kernel)
    and with the sum as a kernel of its own, for each count of slices that fits the shape."""
    out_features, in_features = weights[0].shape
    gigabytes = out_features * in_features * 2 / 1e9
    for splits in (s for s in counts if fitting_splits(in_features, s)):
        for label, product in (("partials", lambda w: split_k_partials(x, w, splits)),
                               ("partials + sum", lambda w: split_k_partials(x, w, splits).sum(0).to(x.dtype))):
            seconds = graph_seconds(lambda: [product(w) for w in weights], 20)[0] / LAYERS
            print(f"| {name} | {x.shape[0]} | split-K {splits}, {label} | {seconds * 1e6:.1f} | "
                  f"{gigabytes / seconds:,.0f} | {cublas_seconds / seconds:.2f}x |", flush=True)
        print(f"|   its kernels: {kernel_names(lambda: split_k_partials(x, weights[0], splits))} | | | | | |")
    print(f"|   F.linear's kernels: {kernel_names(lambda: F.linear(x, weights[0]))} | | | | | |")


def kernel_names(function) -> str:
    """The GPU kernels one call of `function()` launches (names cut to 60 characters)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        function()
        torch.cuda.synchronize()
    return ", ".join(event.key[:60] for event in prof.key_averages() if event.device_type.name == "CUDA")


@click.command()
@click.option("--batch_sizes", default="1,16,64", show_default=True)
@click.option("--skinny", is_flag=True, help="Also time latentmas.kernels.skinny_linear (batch sizes up to "
              f"{MAX_ROWS}) and sweep its tiles; the last column is cuBLAS's time over its.")
@click.option("--split_k", default="", metavar="COUNTS", help="Also time kernels.split_k's partial products over "
              "these counts of slices of K (e.g. 2,4,8), batch sizes up to 16; the last column is cuBLAS's time over its.")
def main(batch_sizes, skinny, split_k):
    device = torch.device("cuda")
    torch.manual_seed(0)
    backends = [torch.backends.cuda.preferred_blas_library()]
    other = {"cublas": "cublaslt", "cublaslt": "cublas"}.get(str(backends[0]).split(".")[-1].lower())
    print(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}; default BLAS {backends[0]}")
    print("\n| shape (out x in) | batch | backend | µs per call | weight GB/s | speed-up |\n|---|---|---|---|---|---|")
    for name, (out_features, in_features) in SHAPES.items():
        weights = [torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02
                   for _ in range(LAYERS)]
        for batch in (int(b) for b in batch_sizes.split(",")):
            x = torch.randn(batch, 1, in_features, device=device, dtype=torch.bfloat16)
            timed = {}
            for backend in (None, other):
                saved = torch.backends.cuda.preferred_blas_library()
                if backend:
                    torch.backends.cuda.preferred_blas_library(backend)
                try:
                    seconds = graph_seconds(lambda: [F.linear(x, w) for w in weights], 20)[0] / LAYERS
                finally:
                    torch.backends.cuda.preferred_blas_library(saved)
                timed[backend] = seconds
                gbps = out_features * in_features * 2 / seconds / 1e9
                print(f"| {name} ({out_features} x {in_features}) | {batch} | {backend or 'default'} | "
                      f"{seconds * 1e6:.1f} | {gbps:,.0f} | |", flush=True)
            if skinny and batch <= MAX_ROWS and ("fused" in name or name in ("o", "down")):
                skinny_rows(f"{name} ({out_features} x {in_features})", weights, x[:, 0], min(timed.values()))
            if split_k and batch <= 16:
                split_k_rows(f"{name} ({out_features} x {in_features})", weights, x[:, 0], timed[None],
                             [int(c) for c in split_k.split(",")])



if __name__ == "__main__":
    main()
