"""The one SQLite database and the only place with SQL: schema, rules, groups, journal, audit queries, accounts."""
