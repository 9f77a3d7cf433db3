"""The user's own database: SQL dialects, dumps, uploaded files and live connections.

- `dialects.py`: the dialect names the app accepts, translation of the model's SQLite SQL into them
  (sqlglot), and which embedded engine checks each dialect faithfully.
"""
