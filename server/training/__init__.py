"""The federated CNN training engine the dsfr and deep stages share: plan, setup, backends, server-
side DP."""
