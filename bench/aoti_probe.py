"""Where does the ahead-of-time compiled decoder (starsql.serve.fast.aoti) fail on a GPU? The one-token step alone,
exported with static shapes (no dynamic dimension), compiled by AOTInductor, then loaded and timed; what the
compiled library links and which OpenMP runtimes the process holds are printed before the load, and the library
is opened alone (ctypes) before torch's loader opens it. Each switch changes one suspect, one process per switch:

    PYTHONFAULTHANDLER=1 python3 bench/aoti_probe.py                    # aoti_compile_and_package, as DECODE_AOTI
    PYTHONFAULTHANDLER=1 python3 bench/aoti_probe.py --mode spaces      # spaces.aoti_compile, as on ZeroGPU
    python3 bench/aoti_probe.py --layers 2                              # the 3B's layer shapes, 2 layers: compiles fast
    python3 bench/aoti_probe.py --config aot_inductor.package_constants_in_so=True   # weights inside the library
    python3 bench/aoti_probe.py --config spaces                         # spaces' own inductor settings
    python3 bench/aoti_probe.py --hide_sklearn                          # transformers without scikit-learn's OpenMP
    PYTHONFAULTHANDLER=1 python3 bench/aoti_probe.py --trivial          # one Linear: does torch's loader work at all?

Prints the export and compile seconds, then three times the seconds of 64 one-token steps and tokens/s, then "loaded".
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zipfile

CACHE = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["package", "spaces"], default="package")
    parser.add_argument("--layers", type=int, default=0, help="Layers of the random 3B shape (0: all 30).")
    parser.add_argument("--config", action="append", default=[],
                        help="An inductor setting KEY=VALUE over the app's (repeatable), or 'spaces' for spaces' own.")
    parser.add_argument("--hide_sklearn", action="store_true", help="Import transformers as if scikit-learn were absent.")
    parser.add_argument("--trivial", action="store_true",
                        help="One Linear layer instead of the model, packaged without settings, then with the app's.")
    args = parser.parse_args()
    if args.hide_sklearn:
        sys.modules["sklearn"] = None  # find_spec then answers None: transformers treats it as not installed

    import torch
    from common import STARCODER2_3B, card, ensure_model, setting

    from starsql.serve.fast.aoti import CODE_ONLY, _exportable, load_decoder
    from starsql.serve.load import load_for_inference

    configs = dict(CODE_ONLY)
    for item in args.config:
        if item == "spaces":
            from spaces.zero.torch.aoti import INDUCTOR_CONFIGS_OVERRIDES

            configs.update(INDUCTOR_CONFIGS_OVERRIDES)
        else:
            configs.update([setting(item)])
    if args.trivial:
        trivial(configs)
        return
    model_dir = f"/tmp/sc2-3b-random-{args.layers}l" if args.layers else "/tmp/sc2-3b-random"
    shape = dict(STARCODER2_3B, num_hidden_layers=args.layers) if args.layers else None
    model, _ = load_for_inference(str(ensure_model(model_dir, shape=shape)), None)
    print(card(), torch.__version__, model.dtype, model.device, "configs", configs, flush=True)
    ids = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    positions = torch.arange(1, device=model.device)
    started = time.perf_counter()
    exported = _exportable(model, CACHE).export(input_ids=ids, cache_position=positions)
    print("export s", round(time.perf_counter() - started, 1), flush=True)
    started = time.perf_counter()
    if args.mode == "spaces":
        import spaces

        step = spaces.aoti_compile(exported, configs)  # loads its package at the first call
    else:
        path = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(tempfile.mkdtemp(), "step.pt2"),
                                                        inductor_configs=configs)  # fmt: skip
        folder = tempfile.mkdtemp()
        zipfile.ZipFile(path).extractall(folder)
        print(subprocess.run(f"find {folder} -name '*.so' | xargs ldd", shell=True, capture_output=True, text=True).stdout)
        print("OpenMP runtimes loaded:", sorted({line.split()[-1] for line in open("/proc/self/maps") if "omp.so" in line or "gomp" in line}),
              "scikit-learn imported:", bool(sys.modules.get("sklearn")), flush=True)  # fmt: skip
        import ctypes
        import glob

        print(subprocess.run("g++ --version | head -1", shell=True, capture_output=True, text=True).stdout, flush=True)
        for library in glob.glob(f"{folder}/**/*.so", recursive=True):  # the library alone: a fault here is its own
            ctypes.CDLL(library)
            print("dlopen alone ok:", os.path.basename(library), flush=True)
        print("loading", flush=True)
        step = load_decoder(path, exported)
    print("compile s", round(time.perf_counter() - started, 1), flush=True)
    with torch.inference_mode():
        for _ in range(3):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            for i in range(64):
                ids = step(input_ids=ids, cache_position=positions + i)[:, -1:].argmax(-1)
                int(ids)  # a streamed answer reads each token
            seconds = time.perf_counter() - started
            print("64 steps s", round(seconds, 4), "tokens/s", round(64 / seconds, 1), flush=True)
    print("loaded", flush=True)


def trivial(configs: dict) -> None:
    """One Linear layer through AOTInductor and torch's loader: without inductor settings (its weights inside the
    package), then with `configs` (the app's: its weights given to the loaded program, as load_decoder does)."""
    import torch

    from starsql.serve.fast.aoti import load_decoder

    linear = torch.nn.Linear(64, 64, device="cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(4, 64, device=linear.weight.device)
    exported = torch.export.export(linear, (x,))
    for name, settings in (("no settings", {}), ("the app's settings", configs)):
        started = time.perf_counter()
        path = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(tempfile.mkdtemp(), "linear.pt2"),
                                                        inductor_configs=settings)  # fmt: skip
        print(f"one Linear, {name}: compiled in {time.perf_counter() - started:.1f} s; loading", flush=True)
        runner = load_decoder(path, exported) if settings else torch._inductor.aoti_load_package(path)
        with torch.inference_mode():
            print(f"one Linear, {name}: loaded; largest difference from eager {float((runner(x) - linear(x)).abs().max()):.2e}", flush=True)


if __name__ == "__main__":
    main()
