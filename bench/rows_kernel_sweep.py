"""The rows kernel (starsql.serve.fast.gemv.rows_kernel: a batched step's linears of 2-16 rows) against cuBLAS, for
each of StarCoder2-3B's linear shapes, random bf16 weights, one GPU:

    python3 bench/rows_kernel_sweep.py --out $OUT/rows_kernel_sweep.json

For 1, 2, 4, 8 and 16 rows: cuBLAS (F.linear, then GELU for c_fc) and the kernels as the decoder's op launches them
(one row: the matrix-vector kernel; more: the rows kernel with its shipped block shape), each timed alone by
triton.testing.do_bench (median, L2 flushed between calls, as a step reads each weight from memory); for --sweep_rows,
every block shape of SWEEP too. `step_us`: a step's linears (30 layers' four, and the head), each way; `sweep_step_us`:
the same for each block shape, the fastest first: where the shipped one comes from. Each call's launch is timed
too, which inflates the small layers' times; a decoding step replays them in a CUDA graph (bench/batched_step.py
times whole steps).
"""

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F
from common import card

sys.path.insert(0, str(__import__("common").ROOT))
from starsql.serve.fast import gemv  # noqa: E402

LAYERS = [("qkv_proj", 3584, 3072, False, 30), ("o_proj", 3072, 3072, False, 30), ("c_fc", 12288, 3072, True, 30),
          ("c_proj", 3072, 12288, False, 30), ("lm_head", 49152, 3072, False, 1)]  # name, out, in, GELU, per step
SWEEP = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
         for n, k, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4, 5))]


def main(argv=None) -> int:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sweep_rows", default="4,16", help="Row counts whose block shapes are swept.")
    args = parser.parse_args(argv)
    sweep_rows = {int(r) for r in args.sweep_rows.split(",") if r}
    torch.manual_seed(0)
    results = {"card": card(), "torch": torch.__version__, "shipped": {**gemv.ROWS_BLOCK, **gemv.ROWS_LAUNCH}, "layers": []}
    step = {}  # rows -> {"cublas": us, "kernel": us}
    sweep = {}  # (rows, config) -> us of a step's linears
    for name, n, k, gelu, count in LAYERS:
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        bias = None if name == "lm_head" else torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.02
        for rows in (1, 2, 4, 8, 16):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)

            def cublas():
                y = F.linear(x, weight, bias)
                return F.gelu(y, approximate="tanh") if gelu else y

            expected = cublas().float()
            shipped = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
            kernel = lambda: gemv.launch(x, weight, bias, shipped, gelu)  # noqa: E731 -- the op's launch, less its host time
            row = {"layer": name, "rows": rows, "cublas_us": 1e3 * triton.testing.do_bench(cublas),
                   "kernel_us": 1e3 * triton.testing.do_bench(kernel),
                   "max_abs_diff": (kernel().float() - expected).abs().max().item()}  # fmt: skip
            for way in ("cublas", "kernel"):
                step.setdefault(rows, {}).setdefault(way, 0.0)
                step[rows][way] += count * row[f"{way}_us"]
            if rows in sweep_rows and rows > 1:
                out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
                for config in SWEEP:
                    try:
                        us = 1e3 * triton.testing.do_bench(lambda c=config: gemv.launch(x, weight, bias, out, gelu, c), rep=40)
                    except Exception:  # noqa: BLE001 -- a shape that does not fit the GPU's shared memory
                        us = float("inf")
                    key = (rows, tuple(config.values()))
                    sweep[key] = sweep.get(key, 0.0) + count * us
            row = {key: round(value, 2) if isinstance(value, float) else value for key, value in row.items()}
            results["layers"].append(row)
            print(json.dumps(row), flush=True)
    results["step_us"] = {rows: {way: round(us, 1) for way, us in ways.items()} | {"ratio": round(ways["cublas"] / ways["kernel"], 3)}
                          for rows, ways in step.items()}  # fmt: skip
    results["sweep_step_us"] = {
        rows: [{"config": dict(zip(SWEEP[0], config)), "us": round(us, 1)}
               for (r, config), us in sorted(sweep.items(), key=lambda item: item[1]) if r == rows and us != float("inf")][:10]
        for rows in sorted(sweep_rows - {1})}  # fmt: skip
    print(json.dumps({"step_us": results["step_us"]}, indent=1))
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
