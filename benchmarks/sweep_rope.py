"""RoPE launch-parameter sweep: forward + backward kernels alone (no autograd), bf16, HF layout.

    python -m benchmarks.sweep_rope

Prints GB/s on the ideal traffic (q, k read and written once each way) against the copy
bandwidth measured in the same run, for tile sizes × warps around the default heuristic. The two
launches are replayed from a CUDA graph: timed as plain Python launches, the host-side launch
cost (hundreds of µs for this many arguments) hides the kernels.
"""

from __future__ import annotations

import torch

from benchmarks.harness import copy_bandwidth_gbps, graphed_ms
from chronicals_fx.kernels import rope as K

SHAPES = ((8, 1024, 14, 2, 64), (4, 4096, 32, 8, 128))


def main() -> None:
    copy = copy_bandwidth_gbps()
    print(f"# {torch.cuda.get_device_name()} copy {copy:.0f} GB/s")
    bf16 = torch.bfloat16
    for B, T, Hq, Hk, D in SHAPES:
        q = torch.randn(B, T, Hq, D, device="cuda", dtype=bf16)
        k = torch.randn(B, T, Hk, D, device="cuda", dtype=bf16)
        cos = torch.randn(1, T, D // 2, device="cuda", dtype=bf16)
        sin = torch.randn_like(cos)
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        ideal = 4 * (q.numel() + k.numel()) * 2
        default = K._tiles(Hq, Hk, D, D)
        print(f"## B={B} T={T} Hq={Hq} Hk={Hk} D={D}  default tile={default}")
        for tile in (None, 512, 1024, 4096):
            for warps in (None, 1, 2, 4, 8):
                def step(q=q, k=k, cos=cos, sin=sin, qo=qo, ko=ko, dq=dq, dk=dk, tile=tile,
                         warps=warps):
                    K.rope_launch(q, k, cos, sin, qo, ko, interleaved=False, half=True,
                                  round_dtype=bf16, tile=tile, num_warps=warps)
                    K.rope_launch(qo, ko, cos, sin, dq, dk, interleaved=False, half=True,
                                  round_dtype=bf16, backward=True, tile=tile, num_warps=warps)
                ms = graphed_ms(step)
                gbps = ideal / ms / 1e6
                print(f"tile={tile} warps={warps}: {ms * 1e3:.1f} us  {gbps:.0f} GB/s "
                      f"{100 * gbps / copy:.0f}% copy", flush=True)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help only
    main()
