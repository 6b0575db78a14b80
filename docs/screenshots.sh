#!/usr/bin/env bash
# Screenshots of the two dashboards for the README, taken by headless Chromium from a finished run.
#   docs/screenshots.sh DATA_ROOT   (after `patchflow run --preset demo --data-root DATA_ROOT`)
# Starts `patchflow ui` (MLflow) and `prefect server start` on the data root's stores, on loopback
# ports, shoots the longest recent pipeline flow run (one that ran its stages), the dit_train run's sample grid and the mae_pretrain
# run's metric charts into docs/, then stops both servers.
set -euo pipefail
root=$(cd "${1:?usage: docs/screenshots.sh DATA_ROOT}" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
bin="$repo/.venv/bin"
profile=$(mktemp -d)
servers=()
# Each server in a session of its own, so the whole group (uvicorn workers included) stops at the end.
trap 'for group in "${servers[@]}"; do kill -- "-$group" 2>/dev/null || true; done; rm -rf "$profile"' EXIT

setsid "$bin/patchflow" ui --data-root "$root" --port 5055 >/dev/null 2>&1 &
servers+=($!)
PREFECT_HOME="$root/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_API_URL=http://127.0.0.1:4299/api \
  setsid "$bin/prefect" server start --host 127.0.0.1 --port 4299 >/dev/null 2>&1 &
servers+=($!)
for url in http://127.0.0.1:5055/ http://127.0.0.1:4299/api/health; do
  for _ in $(seq 60); do curl -sf -o /dev/null "$url" && break; sleep 1; done
  curl -sf -o /dev/null "$url" || { echo "no server answered at $url within 60 s (port taken?)" >&2; exit 1; }
done

ids=$("$bin/python" - "$root" <<'PY'
import sys, json, urllib.request
from mlflow.tracking import MlflowClient
client = MlflowClient(f"sqlite:///{sys.argv[1]}/mlflow.db")
runs = client.search_runs(["1"], order_by=["attributes.start_time DESC"])
stage = lambda name: next(r.info.run_id for r in runs if r.data.tags.get("patchflow.stage") == name)
request = urllib.request.Request("http://127.0.0.1:4299/api/flow_runs/filter", data=b'{"limit": 20, "sort": "START_TIME_DESC", "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}',
                                 headers={"Content-Type": "application/json"})
flow_run = max(json.load(urllib.request.urlopen(request)), key=lambda run: run["total_run_time"])["id"]  # a run that ran, not a cached one
print(stage("dit_train"), stage("mae_pretrain"), flow_run)
PY
)
read -r dit mae flow <<<"$ids"
shoot() {  # OUT SIZE URL
  chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --virtual-time-budget=20000 \
    --window-size="$2" --screenshot="$1" "$3" >/dev/null 2>&1
  echo "wrote $1"
}
shoot "$repo/docs/prefect-flow-run.png" 1500,900 "http://127.0.0.1:4299/runs/flow-run/$flow"
shoot "$repo/docs/mlflow-dit-samples.png" 1500,1100 "http://127.0.0.1:5055/#/experiments/1/runs/$dit/artifacts/samples_final.png"
shoot "$repo/docs/mlflow-mae-metrics.png" 1500,900 "http://127.0.0.1:5055/#/experiments/1/runs/$mae/model-metrics"
