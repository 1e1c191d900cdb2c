#!/usr/bin/env bash
# benchmarks/gpu_step.py on a GPU machine that has torch but not this project's other packages
# (no Ray, MLflow, DeepSpeed, pydantic; nothing downloadable there), in one call.
#
#   bash benchmarks/gpu_check.sh prepare   # here: wheels and 224-px, 10-s shards in runs/gpu (~60 MB)
#   bash benchmarks/gpu_check.sh run [ARGS]  # there, from a copy of this checkout with runs/gpu in it
#
# `run` installs only the carried wheels whose module does not import there, points the spec's
# shard paths at the checkout it runs in, says which of the data path's modules are still
# missing, and runs gpu_step.py: the anchor, AMP, ZeRO-2 (and the variant below), data alone,
# the loop and, last, AMP under torch.compile (minutes to compile: what a timeout cuts off is
# only that). The log goes to $OUT (or runs/gpu) as gpu_step.log. ARGS go to gpu_step.py after its
# own (e.g. `--device cpu --size tiny --batch 4` rehearses the whole call on a CPU).
set -euo pipefail

mode=${1:?usage: bash benchmarks/gpu_check.sh prepare|run}
root=$(cd "$(dirname "$0")/.." && pwd)
gpu=$root/runs/gpu
# Small wheels only (17 MB together). pyarrow and opencv-python-headless (55 MB each) do not fit
# the 64 MiB a device call carries next to the shards; where the machine lacks them, the run says
# so and gives the synthetic figures without the loop.
WHEELS=(hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
    open_clip_torch ftfy wcwidth==0.9.4 albumentations==2.0.8 albucore==0.0.24 simsimd==6.5.16
    stringzilla==5.3.2 nlpaug==1.1.11 soundfile==0.14.0 soxr==1.1.0 tokenizers==0.23.3 safetensors==0.8.0)

prepare() {
    local python=$root/.venv/bin/python
    rm -rf "$gpu" && mkdir -p "$gpu/wheels"
    "$python" -m pip wheel --no-deps -q -w "$gpu/wheels" deepspeed==0.19.8
    "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        --platform any -q -d "$gpu/wheels" "${WHEELS[@]}"
    # The demo world at the `base` model's input: 224-pixel images, 10 s of audio (about 215 kB a
    # sample, most of it audio): 180 samples fit the carry, in shards of 8 so that 14 loader
    # workers all have shards to read. The loop reads them again each epoch, augmented anew.
    "$root/.venv/bin/crossmodal" run "$root/pipelines/configs/demo.yaml" --only ingest,shard,prepare \
        --set name=gpu-check --set "storage.root=$gpu/storage" --set "mlflow.local_store=$gpu/mlflow" \
        --set ingest.demo.num_samples=180 --set shard.samples_per_shard=8 --set prepare.image_size=224 \
        --set prepare.max_audio_seconds=10 --set prepare.batch_size=32
    # The device reads the shards and the spec: not the ingested files, nor the run's record.
    rm -rf "$gpu/mlflow" "$gpu"/storage/stages/ingest
    ls "$gpu"/storage/stages/prepare/*/dataset_spec.json | head -1 >"$gpu/spec_path"
    echo "$root" >"$gpu/prepared_in"
    echo "carry runs/gpu: $(du -sm "$gpu" | cut -f1) MB (at most 64 MiB with the checkout's untracked files)"
    echo 'then, on the device: run(command="bash benchmarks/gpu_check.sh run", carry=["runs/gpu"], timeout_s=560)'
}

run() {
    local site=/tmp/crossmodal-site
    mkdir -p "$site"
    python3 - "$gpu/wheels" "$site" <<'PY'
import importlib.util, pathlib, subprocess, sys
wheels, site = pathlib.Path(sys.argv[1]), sys.argv[2]
module = {"open_clip_torch": "open_clip", "pydantic_core": "pydantic_core"}  # wheel name -> import name
missing = []
for wheel in sorted(wheels.glob("*.whl")):
    name = wheel.name.split("-")[0]
    if importlib.util.find_spec(module.get(name, name.lower())) is None:
        missing.append(str(wheel))
installed, failed = [], []
for wheel in missing:  # one by one: a wheel this Python cannot take costs only its own module
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", site, wheel], capture_output=True, text=True)
    (installed if done.returncode == 0 else failed).append(pathlib.Path(wheel).name.split("-")[0])
print("installed from carried wheels:", ", ".join(installed) or "none", "| failed:", ", ".join(failed) or "none")
PY
    export PYTHONPATH=$site:$root
    # The spec names the shards by absolute path under the checkout it was prepared in.
    python3 - "$(cat "$gpu/spec_path")" "$(cat "$gpu/prepared_in")" "$root" "$gpu/spec.json" <<'PY'
import sys
spec, before, after, out = sys.argv[1:]
text = open(spec.replace(before, after), encoding="utf-8").read()
open(out, "w", encoding="utf-8").write(text.replace(before, after))
PY
    python3 - <<'PY'
import importlib.util
data_path = ["pyarrow", "cv2", "albumentations", "nlpaug", "soundfile", "soxr", "PIL", "yaml", "tokenizers"]
missing = [m for m in data_path if importlib.util.find_spec(m) is None]
print("data path modules missing here:", ", ".join(missing) or "none")
PY
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 "$root/benchmarks/gpu_step.py" --batch 128 --spec "$gpu/spec.json" --loader-workers 8,14 \
        --loop-steps 60 --profile --zero-variant '{"zero_optimization": {"contiguous_gradients": false}}' \
        --compile reduce-overhead "$@" 2>&1 | tee "${OUT:-$gpu}/gpu_step.log"
}

shift
"$mode" "$@"
