#!/usr/bin/env bash
# Coordinator (or any machine with ca.crt and network access to the SuperLink): submit the
# FedDLR app with `flwr run` and stream its log. Arguments go to `flwr run` (e.g.
# --run-config 'stages="cohort,survival" min-sites=3'); results go to FEDDLR_OUT on the
# coordinator.
source "$(dirname "$0")/env.sh"
write_connection
cd "$FEDDLR_APP"
exec flwr run . feddlr --stream --run-config "out-dir=\"$FEDDLR_OUT\"" "$@"
