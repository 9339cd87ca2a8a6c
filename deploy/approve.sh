#!/usr/bin/env bash
# Hospital: after reviewing the FedDLR app (a source folder, or the .fab file the
# coordinator sends), record its FAB's sha256 in $FEDDLR_SITE/approved_apps.txt. The
# SuperNode (deploy/supernode.sh) serves only runs of an approved app; an app folder is
# hashed as `flwr run APP_DIR` builds it. Usage: deploy/approve.sh APP_DIR|FAB [--note TEXT]
source "$(dirname "$0")/env.sh"
need FEDDLR_SITE
exec python "$FEDDLR_APP/deploy/approval.py" approve "${1:?an app folder or a .fab file}" \
    --site "$FEDDLR_SITE" "${@:2}"
