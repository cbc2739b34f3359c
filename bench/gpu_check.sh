#!/usr/bin/env bash
# GPU check: hashray's three GPU paths on one machine with a GPU, each beside the same command on CPU.
#
#   bash bench/gpu_check.sh            # after `make install`, on a machine with an NVIDIA GPU
#
# 1. train: ResNet-50 at 224 px, bf16 autocast (`hashray train --gpu`), images/s of the last epoch;
# 2. encode: the database split with `hashray encode --gpu`, images/s;
# 3. serve: `hashray serve --encoder-gpus 1`, POST /search answered per second by 8 clients;
# and the same three on CPU (a smaller train split, so the CPU side stays short), then the speed-ups.
# For scale: ResNet-50 training at 224 px on one A100-class GPU runs at about 2,500-3,000 images/s
# when the data pipeline keeps up (--data-workers, the CPUs the machine has).
# Sizes are environment variables: TRAIN, CPU_TRAIN, DATABASE, EPOCHS, DATA_WORKERS, LOAD_SECONDS, PORT, OUT.
# CI never has a GPU; the script stops at once without one.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
OUT=${OUT:-build/gpu-check}
TRAIN=${TRAIN:-8192}
CPU_TRAIN=${CPU_TRAIN:-256}
DATABASE=${DATABASE:-8192}
EPOCHS=${EPOCHS:-3}
DATA_WORKERS=${DATA_WORKERS:-$(($(nproc) - 2))}
LOAD_SECONDS=${LOAD_SECONDS:-10}
PORT=${PORT:-8123}

"$BIN/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
  echo "gpu_check: torch sees no CUDA GPU here; run it on a machine with one" >&2
  exit 2
}
mkdir -p "$OUT"
hashray() { "$BIN/hashray" "$@"; }

# The data sets: 224 px synthetic images (drawn once, reused by a second run).
[ -f "$OUT/data/dataset.json" ] || hashray ingest synthetic --out "$OUT/data" --train "$TRAIN" --query 256 \
  --database "$DATABASE" --image-size 224 --num-classes 20 --rows-per-file 1024
[ -f "$OUT/data-cpu/dataset.json" ] || hashray ingest synthetic --out "$OUT/data-cpu" --train "$CPU_TRAIN" \
  --query 64 --database "$CPU_TRAIN" --image-size 224 --num-classes 20

TRAIN_FLAGS=(--arch resnet50 --bits 64 --image-size 224 --batch-size 128 --val-queries 0 --data-workers "$DATA_WORKERS")
train_rate() { # the last epoch's images/s from a run dir's history.json
  "$BIN/python" -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["epochs"][-1]["images_per_s"], 1))' "$1/history.json"
}
rm -rf "$OUT/run-gpu" "$OUT/run-cpu"
hashray train --data "$OUT/data" --run "$OUT/run-gpu" --epochs "$EPOCHS" --gpu --cpus-per-worker 2 "${TRAIN_FLAGS[@]}"
hashray train --data "$OUT/data-cpu" --run "$OUT/run-cpu" --epochs 1 --no-gpu --cpus-per-worker "$(nproc)" "${TRAIN_FLAGS[@]}"
TRAIN_GPU=$(train_rate "$OUT/run-gpu")
TRAIN_CPU=$(train_rate "$OUT/run-cpu")

encode_rate() { # images/s from the last line `hashray encode` logs
  hashray encode --run "$OUT/run-gpu" --data "$1" --split database --out "$2" --overwrite "${@:3}" 2>&1 |
    tee "$2.log" | sed -n 's/.*encode: .* (\([0-9.]*\) images\/s).*/\1/p' | tail -n 1
}
ENCODE_GPU=$(encode_rate "$OUT/data" "$OUT/codes-gpu" --gpu --batch-size 512 --decode-workers "$DATA_WORKERS")
# The encoder actor and the decode task share the CPUs: together they must fit in nproc.
ENCODE_CPU=$(encode_rate "$OUT/data-cpu" "$OUT/codes-cpu" --cpus-per-actor "$(($(nproc) - 1))" --threads-per-actor "$(nproc)")

serve_rate() { # POST /search answered per second by 8 clients for LOAD_SECONDS seconds
  hashray serve --run "$OUT/run-gpu" --codes "$OUT/codes-gpu" --data "$OUT/data" --port "$PORT" "$@" >"$OUT/serve.log" 2>&1 &
  local pid=$!
  "$BIN/python" - "$PORT" "$LOAD_SECONDS" "$OUT/data" <<'EOF'
import concurrent.futures, sys, time
import httpx, pyarrow.parquet as pq
from contracts.dataset import DatasetDir
port, seconds, data = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
url = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 300
while True:
    try:
        if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("gpu_check: hashray serve did not become healthy in 300 s")
    time.sleep(1)
images = pq.read_table(DatasetDir.open(data).split_files("query")[0], columns=["image"]).column("image").to_pylist()
def client(i):
    done, stop = 0, time.monotonic() + seconds
    with httpx.Client(timeout=60) as http:
        while time.monotonic() < stop:
            http.post(f"{url}/search", params={"k": 10}, content=images[(i + done) % len(images)]).raise_for_status()
            done += 1
    return done
started = time.monotonic()
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    total = sum(pool.map(client, range(8)))
print(round(total / (time.monotonic() - started), 1))
EOF
  kill -INT "$pid" && wait "$pid" || true
}
SERVE_GPU=$(serve_rate --encoder-gpus 1)
SERVE_CPU=$(serve_rate --encoder-gpus 0)

"$BIN/python" - "$TRAIN_GPU" "$TRAIN_CPU" "$ENCODE_GPU" "$ENCODE_CPU" "$SERVE_GPU" "$SERVE_CPU" <<'EOF'
import sys
values = [float(v) for v in sys.argv[1:]]
print(f"{'':28} {'GPU':>10} {'CPU':>10} {'speed-up':>9}")
rows = ("train resnet50 224px images/s", "encode images/s", "serve POST /search per s")
for name, gpu, cpu in zip(rows, values[::2], values[1::2]):
    print(f"{name:28} {gpu:10.1f} {cpu:10.1f} {gpu / max(cpu, 1e-9):8.1f}x")
EOF
