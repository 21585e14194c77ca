"""The console: server-rendered pages for people over the accounts, manage, rollups and lifecycle functions."""
