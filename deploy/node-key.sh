#!/usr/bin/env bash
# Hospital, once: the SuperNode's key pair (ECDSA P-384). The private key stays here; send
# the printed .pub file to the coordinator, who registers it.
source "$(dirname "$0")/env.sh"
need FEDDLR_SITE
name="${FEDDLR_NODE_NAME:-$(basename "$FEDDLR_SITE")}"
python "$FEDDLR_APP/deploy/pki.py" supernode-key "$FEDDLR_KEYS" "$name"
