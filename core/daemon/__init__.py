"""The agent process: the composition root that builds every component, and its API server.
Nothing else imports it."""
