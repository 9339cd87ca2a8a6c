# Sourced by the deploy/*.sh scripts: paths, Flower's environment, the CLI connection.
#
#   FEDDLR_DEPLOY     this machine's private deployment folder (default ~/.feddlr-deploy):
#                     tls/ (ca.crt; at the coordinator also the CA key and the SuperLink's
#                     certificate), keys/ (a hospital's SuperNode key pair), supernodes/
#                     (public keys the coordinator registers), superlink.db, flwr-home/
#   FEDDLR_SUPERLINK  host:port of the SuperLink as SuperNodes and `flwr` reach it
#   FEDDLR_LISTEN     coordinator: address the SuperLink binds (default 0.0.0.0)
#   FEDDLR_SITE       hospital: its site folder
#   FEDDLR_NODE_NAME  hospital: name of its key pair (default: the site folder's name)
#   FEDDLR_NODE_PORT  hospital: local port of the SuperNode's runtime API (default 9094)
#   FEDDLR_NODE_CONFIG hospital: more node-config entries (e.g. 'max-query-bytes=536870912')
#   FEDDLR_OUT        coordinator: where the ServerApp writes results (default
#                     $FEDDLR_DEPLOY/runs/latest)
set -euo pipefail

FEDDLR_APP="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FEDDLR_DEPLOY="${FEDDLR_DEPLOY:-$HOME/.feddlr-deploy}"
mkdir -p "$FEDDLR_DEPLOY"
FEDDLR_DEPLOY="$(cd "$FEDDLR_DEPLOY" && pwd)"
FEDDLR_TLS="$FEDDLR_DEPLOY/tls"
FEDDLR_KEYS="$FEDDLR_DEPLOY/keys"
FEDDLR_SUPERNODES="$FEDDLR_DEPLOY/supernodes"
FEDDLR_OUT="${FEDDLR_OUT:-$FEDDLR_DEPLOY/runs/latest}"

if [ -x "$FEDDLR_APP/.venv/bin/flwr" ]; then
    export PATH="$FEDDLR_APP/.venv/bin:$PATH"
fi
# A private Flower home per machine role; Flower never installs packages at run time, and
# never calls out to check for updates or to report usage.
export FLWR_HOME="$FEDDLR_DEPLOY/flwr-home"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_TELEMETRY_ENABLED=0  # no usage events to Flower's servers from a hospital
# SuperExec picks up a new message's ClientApp/ServerApp task within 0.2 s (default 1 s).
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"
export PYTHONUNBUFFERED=1
mkdir -p "$FLWR_HOME"

need() {  # need VAR: stop with a clear message when a required variable is not set
    if [ -z "${!1:-}" ]; then
        echo "deploy: set $1 (see the README section 'Deploying across hospitals')" >&2
        exit 2
    fi
}

superlink_host() { local hp="$FEDDLR_SUPERLINK"; echo "${hp%:*}"; }
superlink_port() { local hp="$FEDDLR_SUPERLINK"; echo "${hp##*:}"; }

write_connection() {  # the `flwr` CLI's connection "feddlr": TLS, trusting only our CA
    need FEDDLR_SUPERLINK
    cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "feddlr"

[superlink.feddlr]
address = "$FEDDLR_SUPERLINK"
root-certificates = "$FEDDLR_TLS/ca.crt"
TOML
}
