#!/usr/bin/env bash
# Coordinator, once: the consortium's certificate authority and the SuperLink's TLS
# certificate for the host in FEDDLR_SUPERLINK (plus any in FEDDLR_TLS_HOSTS, space-separated).
# Give $FEDDLR_DEPLOY/tls/ca.crt to every hospital; ca.key never leaves this machine.
source "$(dirname "$0")/env.sh"
need FEDDLR_SUPERLINK
hosts=(--host "$(superlink_host)")
for extra in ${FEDDLR_TLS_HOSTS:-}; do hosts+=(--host "$extra"); done
python "$FEDDLR_APP/deploy/pki.py" ca "$FEDDLR_TLS" "${hosts[@]}"
echo "give $FEDDLR_TLS/ca.crt to every hospital (their \$FEDDLR_DEPLOY/tls/ca.crt)"
