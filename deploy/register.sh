#!/usr/bin/env bash
# Coordinator: register every hospital public key in $FEDDLR_DEPLOY/supernodes/*.pub that is
# not registered yet (`flwr supernode register`); only registered SuperNodes may connect.
source "$(dirname "$0")/env.sh"
write_connection
mkdir -p "$FEDDLR_SUPERNODES"
touch "$FEDDLR_SUPERNODES/registered.txt"
shopt -s nullglob
for key in "$FEDDLR_SUPERNODES"/*.pub; do
    name="$(basename "$key" .pub)"
    if grep -qxF "$name" "$FEDDLR_SUPERNODES/registered.txt"; then
        continue
    fi
    flwr supernode register "$key" feddlr --name "$name"
    echo "$name" >> "$FEDDLR_SUPERNODES/registered.txt"
done
flwr supernode list feddlr
