#!/usr/bin/env bash
# Run anomalyd locally: environment, default models, a local broker, the daemon, the
# simulator, and a live view of verdicts and alerts. Ctrl-C stops everything.
#   MQTT_HOST=broker.example MQTT_PORT=1883 scripts/start.sh   uses your broker instead;
#   the simulator then publishes nothing there unless SIMULATE=1 (its pumps would be
#   judged, and alerted on, as real devices by anything else subscribed)
source "$(dirname "$0")/env.sh"
ensure_venv "train"
cd "$ROOT"
mkdir -p run
ANOMALYD="$VENV/bin/anomalyd"
pids=()
cleanup() {
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; wait "${pids[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ ! -f "${MODEL_DIR:-models}/manifest.json" ]; then
  echo "== no trained models in ${MODEL_DIR:-models}/: training the default set" >&2
  # TensorFlow's C++ start-up chatter (lines like I0000/E0000) hides the progress lines.
  # (pipefail is on: a failed training still stops this script.)
  "$ANOMALYD" train 2>&1 | { grep --line-buffered -v -e '^[IWE]0000 ' -e '^WARNING: All log messages before absl' >&2 || true; }
fi

if [ -z "${MQTT_HOST:-}" ]; then
  SIMULATE=${SIMULATE:-1}
  MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  [ -x "$MOSQ" ] || { echo "no MQTT_HOST set and no mosquitto binary: install mosquitto or set MQTT_HOST" >&2; exit 1; }
  port=${MQTT_PORT:-$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
  mkdir -p run/mosquitto
  [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1 && chown mosquitto run/mosquitto
  sed -e "s|^listener .*|listener $port 127.0.0.1|" \
      -e "s|^persistence_location .*|persistence_location $ROOT/run/mosquitto/|" \
      mosquitto/mosquitto.conf > run/mosquitto.conf
  "$MOSQ" -c run/mosquitto.conf 2> run/mosquitto.log &
  pids+=($!)
  export MQTT_HOST=127.0.0.1 MQTT_PORT=$port
  echo "== local Mosquitto on 127.0.0.1:$port (log: run/mosquitto.log)" >&2
  sleep 0.5
fi

"$ANOMALYD" run 2> run/anomalyd.log &
pids+=($!)
echo "== anomalyd running (log: run/anomalyd.log; health: http://${HEALTH_HOST:-127.0.0.1}:${HEALTH_PORT:-8000}/health)" >&2
for _ in $(seq 1 60); do
  # /ready, with the bearer token if one is set, never through an http_proxy
  "$VENV/bin/python" -c "
import os, urllib.request as u
f = os.environ.get('HEALTH_TOKEN_FILE')
token = os.environ.get('HEALTH_TOKEN') or (open(f).read().strip() if f else '')
req = u.Request('http://${HEALTH_HOST:-127.0.0.1}:${HEALTH_PORT:-8000}/ready',
                headers={'Authorization': 'Bearer ' + token} if token else {})
u.build_opener(u.ProxyHandler({})).open(req, timeout=1)" 2>/dev/null && break
  kill -0 "${pids[-1]}" 2>/dev/null || { echo "anomalyd exited; see run/anomalyd.log:" >&2; tail -20 run/anomalyd.log >&2; exit 1; }
  sleep 0.5
done
if [ "${SIMULATE:-0}" = 1 ]; then
  "$ANOMALYD" simulate --devices 5 --rate 2 --fault-rate 0.01 2> run/simulate.log &
  pids+=($!)
  echo "== simulator publishing 5 pumps at 2 readings/s (log: run/simulate.log); verdicts and alerts:" >&2
else
  echo "== no simulator on $MQTT_HOST (SIMULATE=1 publishes 5 simulated pumps there); verdicts and alerts:" >&2
fi
"$ANOMALYD" watch
