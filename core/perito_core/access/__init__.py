"""Who may do what: tenants and their tokens, roles, models and storage prefixes; quotas;
the audit log."""
