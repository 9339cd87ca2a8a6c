"""What leaves a site: the egress guard, the disclosure ledger, the privacy officer's audit."""
