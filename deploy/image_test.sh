#!/usr/bin/env bash
# make image-test: serve the demo model from the image and talk to it from the host over loopback.
#
#   deploy/image_test.sh IMAGE MODEL_DIR ADAPTERS_DIR VENV_BIN
#
# The container shares the host's network namespace (--network host) and the server inside binds
# 127.0.0.1 on an ephemeral port, so every packet of the test stays on loopback.
set -euo pipefail
image=$1 model=$2 adapters=$3 bin=$4
name="lorafleet-image-test-$$"
fail() { echo "image-test: FAILED: $*" >&2; docker logs --tail 40 "$name" >&2 2>/dev/null || true; exit 1; }
cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT

[[ -f $model/config.json ]] || fail "no demo model at $model (make demo)"
echo "image-test: no compiler in the image"
docker run --rm --entrypoint /bin/bash "$image" -c '! command -v gcc && ! command -v cc && ! command -v c++' >/dev/null \
    || fail "the image holds a C compiler"

started=$(date +%s)
docker run -d --name "$name" --network host --read-only --tmpfs /tmp --tmpfs /home/lorafleet \
    -v "$model:/models/model:ro" -v "$adapters:/models/adapters:ro" \
    "$image" serve --model /models/model --adapters /models/adapters --host 127.0.0.1 --port 0 --metrics-port 0 >/dev/null

# The ready line is JSON on stdout: {"event": "ready", "port": ..., "metrics_port": ...}
port=""
for _ in $(seq 180); do
    [[ $(docker inspect -f '{{.State.Running}}' "$name") == true ]] || fail "the container exited"
    line=$(docker logs "$name" 2>/dev/null | grep -m1 '"event": "ready"' || true)
    if [[ -n $line ]]; then
        port=$("$bin/python" -c 'import json, sys; print(json.loads(sys.argv[1])["port"])' "$line")
        metrics_port=$("$bin/python" -c 'import json, sys; print(json.loads(sys.argv[1])["metrics_port"])' "$line")
        break
    fi
    sleep 1
done
[[ -n $port ]] || fail "not ready within 180 s"
echo "image-test: ready on 127.0.0.1:$port after $(( $(date +%s) - started )) s"

[[ $(docker exec "$name" id -u) != 0 ]] || fail "the server runs as root"
docker exec "$name" python -c 'from lorafleet.kernels import cpu; assert cpu.library_path().is_file(), cpu.library_path()' \
    || fail "the CPU kernels are not built in the image for this CPU"
docker exec "$name" python /opt/lorafleet/healthcheck.py --target "127.0.0.1:$port" --service lorafleet.v1.LoraFleet \
    || fail "the image's health check"
"$bin/python" deploy/healthcheck.py --target "127.0.0.1:$port" --wait 30 || fail "health from the host"
answer=$("$bin/lorafleet" generate --target "127.0.0.1:$port" --chat --max-new-tokens 16 "What is the capital of France?" 2>/dev/null) \
    || fail "Generate from the host"
echo "image-test: Generate -> ${answer}"
[[ $answer == *Paris* ]] || fail "expected an answer naming Paris"
"$bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10).read()' \
    "http://127.0.0.1:$metrics_port/metrics" || fail "metrics"
docker stop -t 30 "$name" >/dev/null || fail "docker stop"
[[ $(docker inspect -f '{{.State.ExitCode}}' "$name") == 0 ]] || fail "exit code $(docker inspect -f '{{.State.ExitCode}}' "$name") after SIGTERM"
size=$(docker image inspect -f '{{.Size}}' "$image")
echo "image-test: passed ($image, $(( size / 1000000 )) MB)"
