"""Where does the ahead-of-time compiled decoder (starsql.serve.fast.aoti) fail on a GPU? The one-token step alone,
exported with static shapes (no dynamic dimension), compiled by AOTInductor, then loaded and timed; what the
compiled library links and which OpenMP runtimes the process holds are printed before the load.

    PYTHONFAULTHANDLER=1 python3 bench/aoti_probe.py            # torch._inductor.aoti_compile_and_package, as DECODE_AOTI
    PYTHONFAULTHANDLER=1 python3 bench/aoti_probe.py spaces     # spaces.aoti_compile, as on ZeroGPU

Prints the export and compile seconds, then three times the seconds of 64 one-token steps and tokens/s.
"""

import os
import subprocess
import sys
import tempfile
import time
import zipfile

import torch
from common import card, ensure_model

from starsql.serve.fast.aoti import CODE_ONLY, _exportable, load_decoder
from starsql.serve.load import load_for_inference

CACHE = 512


def main(mode: str) -> None:
    model, _ = load_for_inference(str(ensure_model("/tmp/sc2-3b-random")), None)
    print(card(), model.dtype, model.device, flush=True)
    ids = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    positions = torch.arange(1, device=model.device)
    started = time.perf_counter()
    exported = _exportable(model, CACHE).export(input_ids=ids, cache_position=positions)
    print("export s", round(time.perf_counter() - started, 1), flush=True)
    started = time.perf_counter()
    if mode == "spaces":
        import spaces

        step = spaces.aoti_compile(exported)  # loads its package at the first call
    else:
        path = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(tempfile.mkdtemp(), "step.pt2"),
                                                        inductor_configs=dict(CODE_ONLY))  # fmt: skip
        folder = tempfile.mkdtemp()
        zipfile.ZipFile(path).extractall(folder)
        print(subprocess.run(f"find {folder} -name '*.so' | xargs ldd", shell=True, capture_output=True, text=True).stdout)
        print("OpenMP runtimes loaded:", sorted({line.split()[-1] for line in open("/proc/self/maps") if "omp" in line}),
              "scikit-learn imported:", "sklearn" in sys.modules, flush=True)  # fmt: skip
        step = load_decoder(path, exported)
    print("compile s", round(time.perf_counter() - started, 1), flush=True)
    with torch.inference_mode():
        for _ in range(3):
            torch.cuda.synchronize()
            started = time.perf_counter()
            for i in range(64):
                ids = step(input_ids=ids, cache_position=positions + i)[:, -1:].argmax(-1)
                int(ids)  # a streamed answer reads each token
            seconds = time.perf_counter() - started
            print("64 steps s", round(seconds, 4), "tokens/s", round(64 / seconds, 1), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "package")
