"""Parameters every query may carry, and those several stages share."""

from __future__ import annotations

from shared.labels import TASKS
from shared.queries.params import Param

NAME = r"[A-Za-z0-9_.:+\- ]{1,120}"  # a column, model, level or run name as the server sends it
MAX_NAMES = 256  # covariates, models, subgroups: a study names a few
MAX_FEATURES = 20_000  # radiomics columns a site holds (pyradiomics' full set is ~1,700 a reader)
MAX_GRID = 100_000  # edges of any grid before the site's own resolution bound

COMMON = (
    Param("task", "str", "the classification task the labels are read for ('' = none)",
          choices=(*TASKS, ""), value=True),
    Param("needs", "names", "the site inputs the query reads (client.site.folder.present_needs)",
          pattern=r"[a-z_]{1,40}\??", max_items=16, value=False),
    Param("run-variant", "str", "one of several fits in a run (e.g. a LOSO fit): the key of "
          "the files the stage keeps at the site", pattern=r"[A-Za-z0-9_.-]{1,80}", value=False,
          rows=True),
)
RUNS = Param("runs", "names", "earlier run ids whose prediction files the site reads "
             "('' = the newest)", pattern=r"[A-Za-z0-9_.-]{1,80}", max_items=64, value=False)
SOURCE = Param("source", "str", "the feature source: radiomics or a CNN's embeddings",
               pattern=r"[a-z_]{1,40}", value=True)
EXTRACTION = (
    Param("radiomics-params", "str", "pyradiomics parameters: a shipped preset or a file in "
          "the site folder", value=True),
    Param("workers", "int", "extraction processes (0 = the site's cores)", lo=0, hi=256,
          value=False),
    Param("combat", "bool", "use the stage's rows after ComBat harmonization", value=True),
    Param("holdout", "names", "sites held out of training in a leave-one-site-out fit (their "
          "rows are scored, not fitted)", pattern=r"[A-Za-z0-9_.-]{1,80}", max_items=1000,
          rows=True),
    SOURCE,
)
