#!/usr/bin/env bash
# Coordinator: the SuperLink. HTTPS only (Fleet, Control and runtime APIs share one port),
# only SuperNodes whose public key was registered may connect, no dependency installation at
# run time. Its state (registered SuperNodes, runs) lives in $FEDDLR_DEPLOY/superlink.db, so a
# restarted SuperLink keeps its registrations. Runs in the foreground: keep it in a service.
# By default message objects are kept in memory, not in that database
# (deploy/warm_superlink.py: a third of every round); FEDDLR_FAST=0 runs plain
# flower-superlink.
source "$(dirname "$0")/env.sh"
need FEDDLR_SUPERLINK
cd "$FEDDLR_APP"
superlink=(flower-superlink)
if [ "${FEDDLR_FAST:-1}" != "0" ]; then
    superlink=(python "$FEDDLR_APP/deploy/warm_superlink.py")
fi
exec "${superlink[@]}" \
    --ssl-ca-certfile "$FEDDLR_TLS/ca.crt" \
    --ssl-certfile "$FEDDLR_TLS/superlink.crt" \
    --ssl-keyfile "$FEDDLR_TLS/superlink.key" \
    --enable-supernode-auth \
    --disable-runtime-dependency-installation \
    --database "$FEDDLR_DEPLOY/superlink.db" \
    --host "${FEDDLR_LISTEN:-0.0.0.0}" --port "$(superlink_port)"
