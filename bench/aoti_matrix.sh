#!/bin/bash
# One GPU call: which change lets the AOTInductor package load (bench/aoti_probe.py, 2 layers of the 3B's shape, one
# process each), then the decoder's speed at full size with the first change that loaded. Writes $OUT/aoti_matrix.txt.
cd "$(dirname "$0")"
G=$(ldconfig -p | awk '/libgomp.so.1 /{print $NF; exit}')
probe() {  # name, then the command; prints its tail and whether it loaded
    local name=$1; shift
    echo "== $name: $*"
    PYTHONFAULTHANDLER=1 timeout 80 "$@" > /tmp/probe.log 2>&1; local rc=$?
    grep -vE '^\s+lib|vdso|ld-linux|Warning|warn' /tmp/probe.log | tail -22
    echo "exit $rc"; grep -q '^loaded' /tmp/probe.log && LOADED="$LOADED $name"
}
LOADED=""
probe base python3 aoti_probe.py --layers 2
probe in_so python3 aoti_probe.py --layers 2 --config aot_inductor.package_constants_in_so=True
probe spaces_cfg python3 aoti_probe.py --layers 2 --config spaces
probe no_sklearn python3 aoti_probe.py --layers 2 --hide_sklearn
probe gomp env LD_PRELOAD="$G" python3 aoti_probe.py --layers 2
probe spaces_mode python3 aoti_probe.py --layers 2 --mode spaces
echo "== loaded:$LOADED (after ${SECONDS} s)"
ONLY=bf16-merged; EXTRA=(); PRE=()
case " $LOADED " in *" spaces_mode "*) ONLY=$ONLY,aoti-zerogpu;; esac
case " $LOADED " in
  *" base "*) ONLY=$ONLY,aoti;;
  *" in_so "*) ONLY=$ONLY,aoti; EXTRA=(--aoti_config aot_inductor.package_constants_in_so=True);;
  *" gomp "*) ONLY=$ONLY,aoti; PRE=(env LD_PRELOAD="$G");;
esac
echo "== full size: --only $ONLY ${EXTRA[*]} ${PRE[*]}"
PYTHONFAULTHANDLER=1 timeout $((585 - SECONDS)) "${PRE[@]}" python3 generate_speed.py --only "$ONLY" --skip_fp32 --repeats 3 \
    --identity_prompts 2 "${EXTRA[@]}" --out "$OUT/generate_aoti_matrix.jsonl" 2>&1 | grep -vE 'Warning|warn' | tail -40
echo "exit ${PIPESTATUS[0]} after ${SECONDS} s"
