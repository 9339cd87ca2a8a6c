"""Attacks of a hostile coordinator on a default-policy site (issue 25)."""

from __future__ import annotations

from pathlib import Path

from client.site.session import clear_sessions
from simulation.cohort import simulate_cohort


def simulated_site(root: Path) -> Path:
    """The clinical-only site the survival and cohort attacks share: `simulation.cohort`,
    38 patients, seed 4, its site.yaml's privacy block empty."""
    simulate_cohort(root / "sites", n_sites=1, n_patients=38, seed=4, images=False)
    clear_sessions()
    return root / "sites" / "site-1"
