"""The user's own database: SQL dialects, dumps, uploaded files and live connections.

- `workspace.py`: open_workspace, one request's database (schema box, upload or URL) and its check of SQL.
- `dialects.py`: the dialect names, translation of the model's SQLite SQL, and the engine that checks each.
- `dumps.py`: pg_dump, mysqldump, SQLite .schema/.dump and plain DDL read into tables, rows and skipped lines.
- `duck.py`: the DuckDB sandbox, run in worker processes capped in memory and killed after the time budget.
- `files.py`: uploads (.sqlite/.db, .duckdb, CSV/Parquet/JSON lines) checked once, copied between engines.
- `live.py`: a live database by URL (PostgreSQL, MySQL/MariaDB, SQLite, DuckDB), introspected and read-only.
"""
