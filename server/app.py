"""The FedDLR ServerApp: build the transport on Flower's Grid and run the study workflow."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.core.progress import configure_logging
from server.core.transport import GridTransport
from server.workflow import StudyError, record_bad_config, run_study
from shared.config import ConfigError, StudyConfig

app = ServerApp()
log = logging.getLogger("feddlr")


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    try:
        config = StudyConfig.from_run_config(context.run_config)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        record_bad_config(dict(context.run_config), err, str(grid.run.run_id))
        raise SystemExit(2) from None
    transport = GridTransport(grid, round_timeout=config.round_timeout,
                              connect_timeout=config.connect_timeout, min_sites=config.min_sites)
    try:
        run_study(transport, config, run_id=str(grid.run.run_id))
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise SystemExit(2) from None
    except StudyError as err:
        log.error("study stopped: %s", err)
        raise SystemExit(1) from None
