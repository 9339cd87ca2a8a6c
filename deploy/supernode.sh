#!/usr/bin/env bash
# Hospital: the SuperNode serving FEDDLR_SITE. It dials out to the SuperLink over TLS
# (trusting only the consortium CA), signs in with its private key, and runs the FedDLR
# ClientApp, which answers through the site's egress guard. Runs in the foreground.
# FEDDLR_NODE_CONFIG adds node-config entries, e.g. 'max-query-bytes=536870912'.
# By default the SuperNode is kept warm (deploy/warm_supernode.py: Flower's SuperNode with
# short waits after a message, each message's ClientApp forked from a process that has its
# libraries imported); FEDDLR_FAST=0 runs Flower's plain flower-supernode instead.
# Either way it serves only an app the site approved (deploy/approval.py): a FAB whose sha256
# deploy/approve.sh recorded in $FEDDLR_SITE/approved_apps.txt, or one signed by a key in
# FEDDLR_TRUSTED_ENTITIES (Flower's --trusted-entities file); any other is refused before
# any of its code runs, the refusal audited in $FEDDLR_SITE/audit/egress.jsonl.
source "$(dirname "$0")/env.sh"
need FEDDLR_SUPERLINK
need FEDDLR_SITE
name="${FEDDLR_NODE_NAME:-$(basename "$FEDDLR_SITE")}"
site="$(cd "$FEDDLR_SITE" && pwd)"
cd "$FEDDLR_APP"
supernode=(python "$FEDDLR_APP/deploy/approval.py" supernode)
if [ "${FEDDLR_FAST:-1}" != "0" ]; then
    supernode=(python "$FEDDLR_APP/deploy/warm_supernode.py")
fi
if [ -n "${FEDDLR_TRUSTED_ENTITIES:-}" ]; then
    supernode+=(--trusted-entities "$FEDDLR_TRUSTED_ENTITIES")
fi
exec "${supernode[@]}" \
    --superlink "$FEDDLR_SUPERLINK" \
    --root-certificates "$FEDDLR_TLS/ca.crt" \
    --auth-supernode-private-key "$FEDDLR_KEYS/$name.key" \
    --node-config "site-dir=\"$site\" ${FEDDLR_NODE_CONFIG:-}" \
    --host 127.0.0.1 --port "${FEDDLR_NODE_PORT:-9094}"
