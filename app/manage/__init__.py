"""The management API (JWT): apps and keys, rules, event queries. Logic in plain functions, routes in views.py."""
