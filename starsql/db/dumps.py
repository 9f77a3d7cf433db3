"""Reading schema dumps (pg_dump, mysqldump, SQLite's .schema/.dump, plain DDL) into the one schema model.

    dump = parse_dump(text, "postgres")    # Dump(tables, rows, skipped), or DumpError listing every problem
    render_schema(dump.tables)             # the prompt's schema text, the same whatever dialect it came in

Reading goes in three steps, top to bottom in this file:
1. split the text into statements (quotes, comments, MySQL's /*!NNNNN ... */ directives, psql's
   backslash commands, mysql's DELIMITER, T-SQL's GO, pg_dump's COPY ... FROM stdin data blocks);
2. read each statement with sqlglot in the chosen dialect: CREATE TABLE / VIEW / TYPE ... AS ENUM /
   DOMAIN and ALTER TABLE ... ADD (keys, columns) build the tables; INSERT and COPY give rows; what
   holds no schema or data (SET, GRANT, indexes, sequences, owners, comments...) is skipped with a reason;
   names are spelled as the server stores them: PostgreSQL folds unquoted names to lower case,
   Snowflake to upper case (`CREATE TABLE Singers` makes `singers`); quoted names keep their case;
3. column types become SQLite-style names (INTEGER, REAL, NUMERIC, TEXT, VARCHAR(n), DATE, DATETIME,
   BOOLEAN, BLOB...), so the same schema renders the same in every dialect.
Problems are collected, not raised one by one: the user fixes them all at once.
"""

import bisect
import functools
import logging
import re
import sqlite3
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect, NormalizationStrategy
from sqlglot.optimizer.annotate_types import annotate_types
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
from sqlglot.optimizer.qualify import qualify

from ..sandbox import authorizer, open_limited, read_only_authorizer, time_limit
from ..schema import Column, ForeignKey, Table
from .dialects import check_dialect

# sqlglot warns when it falls back to a generic Command; here that only means "not schema".
logging.getLogger("sqlglot").setLevel(logging.ERROR)

MAX_DUMP_CHARS = 32 * 2**20  # a larger dump is refused before it is read (upload a database file instead)
MAX_STATEMENT_CHARS = 200_000  # longest statement sqlglot is asked to read (literal-only INSERTs may be longer)
MAX_PROBLEMS_SHOWN = 20  # str(DumpError) lists this many; .problems holds them all


@dataclass
class Skipped:
    """A statement with no schema or data: where it is, its first words, and why it was skipped."""
    line: int
    words: str
    reason: str


@dataclass
class Dump:
    tables: list[Table] = field(default_factory=list)  # in the dump's order; views are tables with view=True
    rows: dict[str, list[tuple]] = field(default_factory=dict)  # table name -> rows, in its columns' order
    skipped: list[Skipped] = field(default_factory=list)
    views: dict[str, str] = field(default_factory=dict)  # view name -> its SELECT, in the dump's dialect


class DumpError(ValueError):
    """Every problem of a dump, each "line N (`first words...`): what to fix"."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n".join(f"- {problem}" for problem in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"The schema has {len(problems)} {noun}:\n{shown}"
                         + (f"\n- ... and {more} more" if more > 0 else ""))


def first_words(sql: str, limit: int = 60) -> str:
    """How a problem or a skipped statement is quoted: its first words, cut at `limit` characters."""
    words = sql[:limit * 4].split()
    short = " ".join(words[:8])
    return short if len(short) <= limit and len(words) <= 8 else short[:limit - 3].rstrip() + "..."


# ---------------------------------------------------------------------------------------------
# 1. Statements

@dataclass
class Statement:
    line: int  # of its first word, not of a comment above it
    sql: str  # comments removed, MySQL's /*!NNNNN ... */ unwrapped, without the delimiter
    data: str | None = None  # the lines of a COPY ... FROM stdin block
    data_line: int = 0


class _Unclosed(Exception):
    """A quote or comment that never closes: the rest of the text cannot be split (the statements
    before it can still be read, for their problems)."""

    def __init__(self, line: int, what: str, words: str, statements: list[Statement]):
        self.line, self.what, self.words, self.statements = line, what, words, statements


def _token_pattern(dialect: str, delimiter: str) -> re.Pattern:
    """What the splitter must see whole: comments, quoted text, client commands, the delimiter."""
    backslash = dialect in ("mysql", "bigquery")  # their strings have backslash escapes
    if backslash:
        quoted = [r"'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'", r'"[^"\\]*(?:(?:\\.|"")[^"\\]*)*"']
    else:
        quoted = [r"'[^']*(?:''[^']*)*'", r'"[^"]*(?:""[^"]*)*"']
    quoted.append(r"`[^`]*(?:``[^`]*)*`")
    if dialect in ("sqlite", "tsql"):
        quoted.append(r"\[[^\]\n]*\]")
    parts = [r"(?P<comment>--[^\n]*|/\*.*?\*/" + (r"|\#[^\n]*" if dialect == "mysql" else "") + ")"]
    if dialect == "postgres":
        parts.append(r"(?P<escaped>(?<![\w$])[eE]'[^'\\]*(?:(?:\\.|'')[^'\\]*)*')")
        parts.append(r"(?P<dollar>(?<![\w$])\$(?:[A-Za-z_]\w*)?\$)")
        parts.append(r"(?P<client>^[ \t]*\\[^\n]*)")  # psql's \connect, \restrict ...
    if dialect == "mysql":
        parts.append(r"(?P<delimiter>^[ \t]*DELIMITER[ \t]+(?P<new>\S+)[^\n]*)")
    if dialect == "tsql":
        parts.append(r"(?P<go>^[ \t]*GO[ \t]*$)")
    parts.append("(?P<quoted>" + "|".join(quoted) + ")")
    parts.append("(?P<end>" + re.escape(delimiter) + ")")
    parts.append(r"(?P<open>/\*|['\"`])")  # what is left of a quote or comment that never closes
    return re.compile("|".join(parts), re.DOTALL | re.MULTILINE | re.IGNORECASE)


_EXECUTABLE_COMMENT = re.compile(r"/\*M?!\d*(.*)\*/", re.DOTALL)
_COPY_FROM_STDIN = re.compile(r"COPY\b[^;]*?\bFROM\s+STDIN\b", re.IGNORECASE | re.DOTALL)
_COPY_END = re.compile(r"^\\\.[ \t]*$", re.MULTILINE)


def split_dump(text: str, dialect: str) -> list[Statement]:
    """The statements of `text` in order. Raises _Unclosed for a quote or comment that never closes."""
    newlines = [m.start() for m in re.finditer("\n", text)]

    def line_of(offset: int) -> int:
        return bisect.bisect_left(newlines, offset) + 1

    statements, delimiter = [], ";"
    pattern = _token_pattern(dialect, delimiter)
    pieces, first, segment, pos = [], None, 0, 0

    def add(piece: str, offset: int):
        nonlocal first
        if first is None and piece.strip():
            first = offset + len(piece) - len(piece.lstrip())
        pieces.append(piece)

    def finish(end: int) -> Statement | None:
        nonlocal pieces, first
        add(text[segment:end], segment)
        sql, line = "".join(pieces).strip(), line_of(first) if first is not None else 0
        pieces, first = [], None
        if sql:
            statements.append(Statement(line, sql))
            return statements[-1]
        return None

    while True:
        match = pattern.search(text, pos)
        if match is None:
            finish(len(text))
            return statements
        kind, pos = match.lastgroup, match.end()
        if kind == "comment":
            add(text[segment:match.start()], segment)
            inner = _EXECUTABLE_COMMENT.fullmatch(match.group())
            # MySQL runs /*!NNNNN ... */ as SQL; /*M!999999\- ...*/ is a client command (sandbox mode).
            if dialect == "mysql" and inner and not inner.group(1).lstrip().startswith("\\"):
                add(" " + inner.group(1) + " ", match.start())
            else:
                add(" ", match.start())
            segment = pos
        elif kind == "dollar":  # PostgreSQL's $tag$ ... $tag$ body
            close = text.find(match.group(), pos)
            if close < 0:
                raise _Unclosed(line_of(match.start()), f"the {match.group()} quote",
                               first_words(text[match.start():match.start() + 200]), statements)
            pos = close + len(match.group())
        elif kind in ("client", "delimiter") and first is None and not text[segment:match.start()].strip():
            statements.append(Statement(line_of(match.start() + len(match.group()) - len(match.group().lstrip())),
                                        match.group().strip()))
            segment = pos
            if kind == "delimiter":
                delimiter = match.group("new")
                pattern = _token_pattern(dialect, delimiter)
        elif kind in ("end", "go"):
            statement = finish(match.start())
            segment = pos
            if statement and dialect == "postgres" and _COPY_FROM_STDIN.match(statement.sql):
                start = text.find("\n", pos)
                start = len(text) if start < 0 else start + 1
                end = _COPY_END.search(text, start)
                statement.data, statement.data_line = text[start:end.start() if end else len(text)], line_of(start)
                pos = segment = end.end() if end else len(text)
        elif kind == "open":
            what = "the comment" if match.group() == "/*" else f"the {match.group()} quote"
            raise _Unclosed(line_of(match.start()), what, first_words(text[match.start():match.start() + 200]),
                           statements)
        # "quoted", "escaped" and client commands inside a statement: part of the statement's text


# ---------------------------------------------------------------------------------------------
# 2. Reading statements

def _skip_rules() -> list[tuple[re.Pattern, str]]:
    rules = [
        (r"\\", "a psql command"),
        (r"DELIMITER\b", "a mysql client command"),
        (r"SET\b", "a session setting"),
        (r"SELECT\s+pg_catalog\.set_config\b", "a session setting"),
        (r"(SELECT|DO)\s+(pg_catalog\.)?setval\b", "sets a sequence's next value"),
        (r"ALTER\b.*\bOWNER\s+TO\b", "changes an owner"),
        (r"(GRANT|REVOKE)\b", "permissions"),
        (r"COMMENT\s+ON\b", "a comment on an object (the prompt shows tables, columns, types and keys)"),
        (r"CREATE\s+(UNIQUE\s+|FULLTEXT\s+|SPATIAL\s+)?INDEX\b", "an index"),
        (r"(CREATE|ALTER)\s+SEQUENCE\b", "a sequence (the column it numbers is in its table)"),
        (r"(CREATE|ALTER|DROP)\s+(OR\s+REPLACE\s+)?(DEFINER\s*=\s*\S+\s+)?(FUNCTION|PROCEDURE|TRIGGER|RULE|"
         r"AGGREGATE|OPERATOR|EVENT|POLICY|PUBLICATION|SUBSCRIPTION|STATISTICS|COLLATION|CAST|TEXT\s+SEARCH|"
         r"CONVERSION|LANGUAGE|SERVER|FOREIGN\s+DATA\s+WRAPPER|USER|ROLE|EVENT\s+TRIGGER|ACCESS\s+METHOD|"
         r"TRANSFORM|TABLESPACE)\b", "code or server objects, not tables"),
        (r"(CREATE|ALTER)\s+(SCHEMA|DATABASE|EXTENSION)\b", "creates a schema, database or extension"),
        (r"ALTER\s+(DATABASE|SCHEMA|TYPE|DOMAIN|EXTENSION|DEFAULT\s+PRIVILEGES|VIEW|MATERIALIZED\s+VIEW)\b",
         "changes no table's columns or keys"),
        (r"DROP\b", "drops an object (a dump is read from scratch)"),
        (r"(DELETE|UPDATE|TRUNCATE|MERGE)\b", "changes rows (only CREATE, INSERT and COPY are read)"),
        (r"(LOCK|UNLOCK)\s+TABLES?\b|LOCK\b", "locks tables"),
        (r"(BEGIN|COMMIT|ROLLBACK|END|START\s+TRANSACTION|SAVEPOINT|RELEASE)\b", "a transaction boundary"),
        (r"PRAGMA\b", "a SQLite setting"),
        (r"USE\b", "chooses a database"),
        (r"(ANALYZE|VACUUM|REINDEX|CHECKPOINT|OPTIMIZE|FLUSH|CLUSTER|REFRESH\s+MATERIALIZED\s+VIEW)\b", "maintenance"),
        (r"SECURITY\s+LABEL\b", "a security label"),
        (r"DO\b", "a code block"),
        (r"(SELECT|WITH|VALUES|SHOW|EXPLAIN|DESCRIBE|CALL)\b", "a query: no schema or data"),
    ]
    return [(re.compile(pattern, re.IGNORECASE | re.DOTALL), reason) for pattern, reason in rules]


SKIP_RULES = _skip_rules()
_CREATE = re.compile(r"CREATE\s+(?:(?:OR\s+REPLACE|TEMP|TEMPORARY|UNLOGGED|GLOBAL|LOCAL|MATERIALIZED|RECURSIVE|"
                     r"TRANSIENT|SECURE|ALGORITHM\s*=\s*\S+|DEFINER\s*=\s*\S+|SQL\s+SECURITY\s+\w+)\s+)*"
                     r"(TABLE|VIEW|TYPE|DOMAIN|VIRTUAL TABLE)\b")

def _sign(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE | re.MULTILINE)


# Marks of a dialect in a statement: (dialect, its marks, its name, the dialects that share the marks).
DIALECT_SIGNS = [
    ("mysql", _sign(r"/\*!\d|\bAUTO_INCREMENT\b|\bENGINE\s*=|\bUNSIGNED\b|\bLOCK TABLES\b|\\'"),
     "MySQL/MariaDB (mysqldump)", {"bigquery"}),
    ("mysql", _sign(r"`"), "MySQL/MariaDB (mysqldump)", {"bigquery", "sqlite"}),  # SQLite reads backticks too
    ("postgres", _sign(r"::\s*[a-z]|\bnextval\s*\(|\bFROM\s+stdin\b|\bOWNER\s+TO\b|\bpg_catalog\.|"
                       r"\bcharacter varying\b|\bwithout time zone\b|^\\"), "PostgreSQL (pg_dump)", {"duckdb"}),
    ("tsql", _sign(r"\[dbo\]|\bIDENTITY\s*\(|\bNVARCHAR\s*\(\s*MAX\b|^GO$"), "SQL Server (T-SQL)", set()),
    ("sqlite", _sign(r"\bAUTOINCREMENT\b|\bWITHOUT\s+ROWID\b|\bPRAGMA\b"), "SQLite", set()),
]


def dialect_hint(sql: str, dialect: str) -> str | None:
    """'this looks like MySQL...; choose the dialect mysql' when `sql` shows another dialect's marks."""
    for name, pattern, words, sharing in DIALECT_SIGNS:
        if dialect != name and dialect not in sharing and pattern.search(sql):
            return f"this looks like {words}; choose the dialect {name}"
    return None


def _names(expressions) -> list[str]:
    """Column names of a key's column list (Identifier, Column, Ordered, MySQL's prefix `col(10)`)."""
    names = []
    for expression in expressions:
        while isinstance(expression, (exp.Ordered, exp.Anonymous)) or (
                isinstance(expression, exp.Func) and not isinstance(expression, exp.Column)):
            expression = expression.this
        names.append(expression.name if isinstance(expression, exp.Expression) else str(expression))
    return names


def _table_name(table: exp.Expression) -> str:
    """A table's own name: `public.x` and `db`.`x` are x."""
    while isinstance(table, exp.Schema):
        table = table.this
    return table.name


def folds_names(dialect: str) -> bool:
    """Whether the dialect's server stores unquoted names folded to one case (PostgreSQL: lower,
    Snowflake: upper). The others keep them as written (MySQL, SQL Server, BigQuery, SQLite) or
    compare them ignoring case but keep how they were written (DuckDB)."""
    strategy = Dialect.get_or_raise(dialect).normalization_strategy
    return strategy in (NormalizationStrategy.LOWERCASE, NormalizationStrategy.UPPERCASE)


def _stored_names(tree: exp.Expression, dialect: str) -> exp.Expression:
    """`tree` with its unquoted names as the server stores them (in place)."""
    return normalize_identifiers(tree, dialect=dialect) if folds_names(dialect) else tree


def _stored_name(written: str, dialect: str) -> str:
    """A name taken from the text by a regular expression (`"Audit"`, `public.m`), as the server stores it."""
    written = written.strip().split(".")[-1]
    name = _unquote(written)
    if name != written or not folds_names(dialect):
        return name
    return normalize_identifiers(exp.to_identifier(name), dialect=dialect).name


def _reference(reference: exp.Reference) -> tuple[str, list[str]]:
    target = reference.this
    columns = _names(target.expressions) if isinstance(target, exp.Schema) else []
    return _table_name(target), columns


class _Problem(Exception):
    """One statement's problem (the reader adds its line, unless given, and its first words)."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


class _Failed(_Problem):
    """Rows of a table whose CREATE TABLE already has a problem: nothing new to report."""


class Reader:
    """Reads statements in order into tables, rows and skipped statements, collecting problems."""

    def __init__(self, dialect: str):
        self.dialect = dialect
        self.tables: dict[str, Table] = {}  # by name, in creation order
        self.created_at: dict[str, int] = {}
        self.rows: dict[str, list[tuple]] = {}
        self.skipped: list[Skipped] = []
        self.problems: list[str] = []
        self.types: dict[str, str] = {}  # enum and domain names -> normalised type
        self.partitions: dict[str, str] = {}  # a partition's name -> its parent's (rows go to the parent)
        self.sqlite: sqlite3.Connection | None = None  # computes constant row values (sqlite dialect)
        self.failed: set[str] = set()  # lower-cased names of tables whose CREATE had a problem
        self.views: dict[str, str] = {}  # view name -> its query, in the dump's dialect
        # table name -> column name -> its DEFAULT's value, _NUMBERED (serial, AUTO_INCREMENT, identity,
        # nextval) or _NOT_CONSTANT (now(), ...): what rows whose INSERT omits the column get there.
        self.defaults: dict[str, dict[str, object]] = {}
        self.numbered: dict[tuple[str, str], int] = {}  # (table, column) -> the last number given
        self.unapplied: set[tuple[str, str]] = set()  # non-constant defaults already listed as skipped

    def problem(self, statement: Statement, message: str, line: int | None = None):
        hint = dialect_hint(statement.sql, self.dialect)
        text = f"line {line or statement.line} (`{first_words(statement.sql)}`): {message}"
        self.problems.append(text + (f" ({hint})" if hint and hint not in message else ""))

    def skip(self, statement: Statement, reason: str):
        self.skipped.append(Skipped(statement.line, first_words(statement.sql), reason))

    def read(self, statement: Statement):
        try:
            return self.dispatch(statement)
        except _Failed:
            return
        except _Problem as problem:
            self.problem(statement, str(problem), problem.line)
        except RecursionError:
            self.problem(statement, "nested too deeply to read; simplify the statement")
        created = _CREATED_NAME.match(statement.sql)
        if created:  # its rows would only repeat the problem
            self.failed.add(_unquote(created.group("name").split(".")[-1]).lower())

    def dispatch(self, statement: Statement):
        sql = statement.sql
        if sql[:6].upper() == "INSERT" or sql[:7].upper() == "REPLACE":  # the many statements of a big dump
            return self.insert(statement)
        if statement.data is not None:
            return self.copy(statement)
        if sql.startswith("\\") and self.dialect != "postgres":
            raise _Problem("a psql command")  # the hint names the dialect
        head = " ".join(sql[:300].split()).upper()
        if head.startswith("COPY "):
            raise _Problem("COPY reads a file on the server; use pg_dump's `COPY ... FROM stdin;` blocks or INSERTs")
        match = _CREATE.match(head)
        if match:
            return getattr(self, "create_" + match.group(1).lower().replace(" ", "_"))(statement)
        if re.match(r"ALTER\s+TABLE\b", head) and not re.search(r"\bOWNER\s+TO\b", head):
            return self.alter_table(statement)
        for pattern, reason in SKIP_RULES:
            if pattern.match(sql):
                return self.skip(statement, reason)
        parsed = self.parse(statement)
        self.skip(statement, f"no schema or data (a {type(parsed).__name__.upper()} statement)")

    def parse(self, statement: Statement) -> exp.Expression:
        if len(statement.sql) > MAX_STATEMENT_CHARS:
            raise _Problem(f"{len(statement.sql):,} characters, more than the {MAX_STATEMENT_CHARS:,} a "
                           "statement may have; split it")
        try:
            parsed = sqlglot.parse(statement.sql, read=self.dialect)
        except (sqlglot.errors.ParseError, sqlglot.errors.TokenError) as error:
            raise _Problem(f"{self.dialect} cannot read it: {_short_error(error, statement.line)}") from None
        except RecursionError:
            raise
        except Exception as error:  # sqlglot raises others on odd input
            raise _Problem(f"{self.dialect} cannot read it: {type(error).__name__}: {error}") from None
        parsed = [p for p in parsed if p is not None]
        if len(parsed) != 1:
            raise _Problem("this is more than one statement; end each with ';'")
        return _stored_names(parsed[0], self.dialect)

    # -- tables -----------------------------------------------------------------------------

    def add_table(self, statement: Statement, table: Table):
        if table.name.lower().startswith("sqlite_"):
            return self.skip(statement, "SQLite's own table")
        old = self.tables.get(table.name)
        if old is not None and not (old.view or table.view):
            raise _Problem(f"table `{table.name}` is created twice (first on line {self.created_at[table.name]}); "
                           "keep one (a dump of several schemas? dump one schema)")
        self.tables[table.name] = table  # a view replaces its placeholder in place (mysqldump writes both)
        self.created_at[table.name] = statement.line

    def create_type(self, statement: Statement):
        parsed = re.match(r"CREATE\s+TYPE\s+(?P<name>[^\s(]+)\s+AS\s+ENUM\s*\((?P<values>.*)\)\s*$",
                          statement.sql, re.IGNORECASE | re.DOTALL)
        if not parsed:
            return self.skip(statement, "a composite or other type; columns of it are shown as TEXT")
        name = _stored_name(parsed.group("name"), self.dialect)
        self.types[name.lower()] = "TEXT"
        values = " ".join(parsed.group("values").split())
        self.skip(statement, f"the enum type {name} ({values}): its columns are shown as TEXT")

    def create_domain(self, statement: Statement):
        parsed = re.match(r"CREATE\s+DOMAIN\s+(?P<name>\S+)\s+(?:AS\s+)?(?P<type>.*?)(\s+(DEFAULT|NOT|NULL|CHECK|"
                          r"CONSTRAINT|COLLATE)\b.*)?$", statement.sql, re.IGNORECASE | re.DOTALL)
        if not parsed:
            raise _Problem("write a domain as `CREATE DOMAIN name AS type ...`")
        try:
            kind = exp.DataType.build(parsed.group("type"), dialect=self.dialect)
        except Exception:
            kind = None
        name = _stored_name(parsed.group("name"), self.dialect)
        self.types[name.lower()] = sqlite_type(kind, self.dialect, self.types)
        self.skip(statement, f"the domain {name}: its columns are shown as {self.types[name.lower()]}")

    def create_table(self, statement: Statement):
        partition = _PARTITION.match(statement.sql)
        if partition:
            child, parent = (_stored_name(partition.group(g), self.dialect) for g in ("child", "parent"))
            self.partitions[child] = parent
            return self.skip(statement, f"a partition of {parent}: its rows are loaded into {parent}")
        if self.dialect == "tsql":  # SSMS's storage clauses, which sqlglot does not read
            statement = Statement(statement.line, re.sub(r"\s+(TEXTIMAGE_ON|FILESTREAM_ON)\s+(\[[^\]]*\]|\w+)", "",
                                                         statement.sql, flags=re.IGNORECASE))
        create = self.parse(statement)
        if not isinstance(create, exp.Create) or create.kind != "TABLE":
            raise _Problem(f"{self.dialect} reads this as {type(create).__name__}, not CREATE TABLE: check its syntax")
        if isinstance(create.expression, exp.Query):  # CREATE TABLE ... AS SELECT
            return self.add_query_table(statement, create, view=False)
        if not isinstance(create.this, exp.Schema):
            raise _Problem("a CREATE TABLE without columns; list them: CREATE TABLE t (a INTEGER, ...)")
        table = Table(_table_name(create.this), [])
        inherits = re.search(r"\bINHERITS\s*\(([^)]*)\)", statement.sql, re.IGNORECASE)
        for parent in inherits.group(1).split(",") if inherits else []:  # PostgreSQL: the parents' columns first
            parent_table = self.table(_stored_name(parent, self.dialect), "inherited from")
            table.columns += [Column(c.name, c.type) for c in parent_table.columns]
        for item in create.this.expressions:
            if isinstance(item, exp.ColumnDef):
                self.add_column(table, item)
            elif isinstance(item, (exp.Identifier, exp.Column)):  # SQLite allows a column without a type
                table.columns.append(Column(item.name, "TEXT"))
            else:
                self.add_constraint(table, item)
        if not table.columns:
            raise _Problem(f"table `{table.name}` has no columns")
        self.add_table(statement, table)

    def create_virtual_table(self, statement: Statement):
        """SQLite's CREATE VIRTUAL TABLE t USING fts5(a, b, tokenize=...): a table of its named columns."""
        parsed = re.match(rf"CREATE\s+VIRTUAL\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(?P<name>{_IDENT}(?:\.{_IDENT})?)\s+"
                          r"USING\s+\w+\s*\((?P<args>.*)\)\s*$", statement.sql, re.IGNORECASE | re.DOTALL)
        columns = [_unquote(arg.split()[0]) for arg in (parsed.group("args").split(",") if parsed else [])
                   if arg.strip() and "=" not in arg]
        if not columns:
            return self.skip(statement, "a virtual table whose columns cannot be told from its arguments")
        name = _stored_name(parsed.group("name"), self.dialect)
        self.add_table(statement, Table(name, [Column(column, "TEXT") for column in columns]))

    def add_column(self, table: Table, column: exp.ColumnDef):
        kind = column.args.get("kind")
        table.columns.append(Column(column.name, sqlite_type(kind, self.dialect, self.types)))
        default = self.column_default(column)
        if default is not _NO_DEFAULT:
            self.defaults.setdefault(table.name, {})[column.name] = default
        for constraint in column.constraints:
            kind = constraint.args.get("kind")
            if isinstance(kind, exp.PrimaryKeyColumnConstraint):
                table.primary_key = [column.name]
            elif isinstance(kind, exp.Reference):
                ref_table, ref_columns = _reference(kind)
                table.foreign_keys.append(ForeignKey([column.name], ref_table, ref_columns))

    def column_default(self, column: exp.ColumnDef):
        """The value a row that omits `column` gets: a constant, _NUMBERED, _NOT_CONSTANT or _NO_DEFAULT."""
        kind = column.args.get("kind")
        if kind is not None and kind.this in _SERIAL_TYPES:
            return _NUMBERED
        for constraint in column.constraints:
            kind = constraint.args.get("kind")
            if isinstance(kind, (exp.AutoIncrementColumnConstraint, exp.GeneratedAsIdentityColumnConstraint)):
                return _NUMBERED
            if isinstance(kind, exp.DefaultColumnConstraint):
                value = kind.this.unnest() if isinstance(kind.this, exp.Paren) else kind.this  # T-SQL's ((5))
                if isinstance(value, exp.Anonymous) and value.name.lower() == "nextval":
                    return _NUMBERED
                try:
                    return _constant(value, self.dialect)
                except _Problem:
                    return _NOT_CONSTANT
        return _NO_DEFAULT

    def default_values(self, statement: Statement, table: Table, omitted: list[str], count: int) -> list[tuple]:
        """For `count` rows whose INSERT omits the columns `omitted`: each row's values there, from the
        columns' defaults (NULL where there is none); serial columns numbered on from the last number."""
        defaults = self.defaults.get(table.name, {})
        columns = []
        for name in omitted:
            default = defaults.get(name)
            if default is _NUMBERED:
                start = self.numbered.get((table.name, name), 0)
                self.numbered[(table.name, name)] = start + count
                columns.append(range(start + 1, start + count + 1))
                continue
            if default is _NOT_CONSTANT and (table.name, name) not in self.unapplied:
                self.unapplied.add((table.name, name))
                self.skip(statement, f"the DEFAULT of `{table.name}`.`{name}` is not a constant: defaults not "
                                     "applied, rows that omit the column hold NULL there")
            columns.append([None if default is _NOT_CONSTANT else default] * count)
        return list(zip(*columns)) if columns else [()] * count

    def add_constraint(self, table: Table, item: exp.Expression):
        """A table constraint: PRIMARY KEY and FOREIGN KEY go into the table; UNIQUE, CHECK, KEY... do not show."""
        parts = item.expressions if isinstance(item, exp.Constraint) else [item]
        for index, part in enumerate(parts):
            if isinstance(part, exp.PrimaryKey):
                table.primary_key = _names(part.expressions)
            elif isinstance(part, exp.PrimaryKeyColumnConstraint) and index + 1 < len(parts):  # T-SQL's
                listed = parts[index + 1].this  # PRIMARY KEY CLUSTERED (a ASC, b)
                table.primary_key = _names(listed if isinstance(listed, list) else [])
            elif isinstance(part, exp.ForeignKey):
                ref_table, ref_columns = _reference(part.args["reference"])
                table.foreign_keys.append(ForeignKey(_names(part.expressions), ref_table, ref_columns))

    def create_view(self, statement: Statement):
        view = re.search(r"\bVIEW\b", statement.sql, re.IGNORECASE)
        options = re.sub(r"\b(ALGORITHM\s*=\s*\w+|DEFINER\s*=\s*\S+|SQL\s+SECURITY\s+\w+)\s*", "",
                         statement.sql[:view.start()], flags=re.IGNORECASE)  # mysqldump's, which sqlglot need not read
        body = re.sub(r"\s+WITH\s+(NO\s+)?DATA\s*$", "", statement.sql[view.start():], flags=re.IGNORECASE)
        create = self.parse(Statement(statement.line, options + body))  # (a materialized view's WITH NO DATA)
        if not isinstance(create, exp.Create) or not isinstance(create.expression, exp.Query):
            return self.skip(statement, "a view sqlglot reads without a query: its columns are unknown")
        self.add_query_table(statement, create, view=True)

    def add_query_table(self, statement: Statement, create: exp.Create, view: bool):
        """A view (or CREATE TABLE ... AS SELECT) as a table of its columns, typed where sqlglot can tell;
        skipped when its columns cannot be told (a `*` over a table the dump does not create)."""
        query, name = create.expression, _table_name(create.this)
        named = isinstance(create.this, exp.Schema) and _names(create.this.expressions)  # CREATE VIEW v (a, b) AS
        # sqlglot matches names as the dialect folds their case; here they match whatever their case
        # (a view's columns are named as its query or its tables spell them).
        tables = [t for t in self.tables.values() if t.name != name]
        schema = {t.name.lower(): {c.name.lower(): c.type for c in t.columns} for t in tables}
        spelled = {c.name.lower(): c.name for t in tables for c in t.columns}
        folded = query.copy()
        for identifier in folded.find_all(exp.Identifier):
            identifier.set("this", identifier.name.lower())
            identifier.set("quoted", False)
        try:
            typed = annotate_types(qualify(folded, schema=schema, dialect=self.dialect, validate_qualify_columns=False),
                                   schema=schema, dialect=self.dialect)
            columns = [Column(spelled.get(s.alias_or_name.lower(), s.alias_or_name), sqlite_type(s.type, self.dialect, self.types))
                       for s in typed.selects]
        except RecursionError:
            raise
        except Exception:  # sqlglot cannot resolve it (an unknown table, a star it cannot expand)
            columns = [Column(n, "TEXT") for n in query.named_selects] if "*" not in query.sql() else []
        if not any(s.is_star for s in query.selects) and len(query.named_selects) == len(columns):
            for column, original in zip(columns, query.named_selects):  # keep the names' case as written
                column.name = original
        if named and len(named) == len(columns):
            for column, column_name in zip(columns, named):
                column.name = column_name
        if not columns or any(not c.name or c.name == "*" for c in columns):
            return self.skip(statement, f"the columns of `{name}` cannot be told from its query (a `*` over a "
                                        "table this dump does not create?)")
        self.add_table(statement, Table(name, columns, view=view))
        if view:  # its query, with names as the tables now have them (public.x is x)
            query = query.copy()
            for table in query.find_all(exp.Table):
                table.set("db", None)
                table.set("catalog", None)
            self.views[name] = query.sql(dialect=self.dialect)

    def alter_table(self, statement: Statement):
        if re.search(r"\bADD\s+GENERATED\b.*\bAS\s+IDENTITY\b", statement.sql, re.IGNORECASE | re.DOTALL):
            return self.skip(statement, "makes a column an identity column (its values are numbered)")
        if not re.search(r"\bADD\b", statement.sql, re.IGNORECASE):
            return self.skip(statement, "changes no table's columns or keys")
        alter = self.parse(statement)
        if not isinstance(alter, exp.Alter):
            if re.search(r"\b(PRIMARY\s+KEY|FOREIGN\s+KEY|COLUMN)\b", statement.sql, re.IGNORECASE):
                raise _Problem(f"{self.dialect} cannot read this ALTER TABLE; check its syntax")
            return self.skip(statement, "changes no table's columns or keys")
        name = _table_name(alter.this)
        table = self.table(name, "altered")
        shown = False
        for action in alter.actions:
            if isinstance(action, exp.ColumnDef):
                self.add_column(table, action)
                shown = True
            elif isinstance(action, exp.AddConstraint):
                keys = (len(table.primary_key), len(table.foreign_keys))
                for item in action.expressions:
                    self.add_constraint(table, item)
                shown = shown or keys != (len(table.primary_key), len(table.foreign_keys))
        if not shown:
            self.skip(statement, "a unique key, check or other constraint (the prompt shows primary and foreign keys)")

    def table(self, name: str, what: str) -> Table:
        name = self.partitions.get(name, name)
        table = self.tables.get(name) or next((t for t in self.tables.values() if t.name.lower() == name.lower()), None)
        if table is None and name.lower() in self.failed:
            raise _Failed(name)
        if table is None:
            raise _Problem(f"table `{name}` is {what} here but not created before; put its CREATE TABLE first")
        return table

    # -- rows ---------------------------------------------------------------------------------

    def insert(self, statement: Statement):
        # sqlglot reads neither MySQL's REPLACE INTO nor PostgreSQL's OVERRIDING SYSTEM VALUE (pg_dump
        # --inserts of identity columns); for the rows they mean INSERT INTO ... VALUES.
        sql = re.sub(r"^REPLACE\b", "INSERT", statement.sql[:2000], flags=re.IGNORECASE)
        sql = re.sub(r"\bOVERRIDING\s+(SYSTEM|USER)\s+VALUE\b", "", sql, count=1, flags=re.IGNORECASE)
        if sql != statement.sql[:2000]:
            statement = Statement(statement.line, sql + statement.sql[2000:])
        head = _INSERT_HEAD.match(statement.sql)
        rows = head and literal_rows(statement.sql, head.end(), self.dialect)
        if rows is not None:  # the INSERT INTO ... part is read once for all statements that share it
            name, columns = _insert_target(statement.sql[:head.end()], self.dialect)
        else:
            insert = self.parse(statement)
            values = insert.expression if isinstance(insert, exp.Insert) else None
            if not isinstance(values, exp.Values):
                raise _Problem("only INSERT ... VALUES rows are loaded; write the rows as VALUES (...)")
            rows = [tuple(self.constant(value) for value in row.expressions) for row in values.expressions]
            name, columns = _target(insert.this)
        self.add_rows(statement, name, columns, rows)

    def constant(self, value: exp.Expression):
        """A VALUES item as a Python value. SQLite's .dump writes text with newlines as
        replace('a\\nb','\\n',char(10)): in the sqlite dialect, SQLite itself computes such constants."""
        try:
            return _constant(value, self.dialect)
        except _Problem:
            if self.dialect != "sqlite" or value.find(exp.Column, exp.Query) is not None:
                raise
        if self.sqlite is None:
            self.sqlite = open_limited()
        try:
            with authorizer(self.sqlite, read_only_authorizer), time_limit(self.sqlite, 1.0):
                return self.sqlite.execute("SELECT " + value.sql(dialect="sqlite")).fetchone()[0]
        except (sqlite3.Error, OverflowError) as error:
            raise _Problem(f"the value `{value.sql()[:40]}` cannot be computed: {error}") from None

    def close(self):
        if self.sqlite is not None:
            self.sqlite.close()

    def copy(self, statement: Statement):
        copy = self.parse(statement)
        target = copy.this
        table = self.table(_table_name(target), "loaded")
        names = _names(target.expressions) if isinstance(target, exp.Schema) and target.expressions else None
        types = {c.name: c.type for c in table.columns}
        column_types = [types.get(n, "TEXT") for n in names] if names else [c.type for c in table.columns]
        if re.search(r"\b(CSV|BINARY)\b", statement.sql, re.IGNORECASE):
            raise _Problem("only COPY's text format is read (what pg_dump writes); dump without CSV options")
        lines = statement.data.split("\n")
        rows = []
        for offset, line in enumerate(lines[:-1] if lines[-1] == "" else lines):  # the data ends with a newline
            fields = line.split("\t")
            if len(fields) != len(column_types):
                raise _Problem(f"{_count(len(fields), 'tab-separated value')} for "
                               f"{_count(len(column_types), 'column')} of `{table.name}`", statement.data_line + offset)
            rows.append(tuple(_copy_value(field, kind) for field, kind in zip(fields, column_types)))
        self.add_rows(statement, table.name, names, rows)

    def add_rows(self, statement: Statement, name: str, columns: list[str] | None, rows: list[tuple]):
        if name.lower().startswith("sqlite_"):
            return self.skip(statement, "rows of SQLite's own table")
        table = self.table(name, "given rows")
        if table.view:
            raise _Problem(f"`{table.name}` is a view; rows go into tables")
        width = len(columns) if columns else len(table.columns)
        names = table.column_names()
        if columns:  # as the table spells them (PostgreSQL folds unquoted names to lower case)
            spelled = {name.lower(): name for name in names}
            columns = [c if c in names else spelled.get(c.lower(), c) for c in columns]
            unknown = [c for c in columns if c not in names]
            if unknown:
                raise _Problem(f"table `{table.name}` has no column {', '.join(map(repr, unknown))}")
        for index, row in enumerate(rows):
            if len(row) != width:
                raise _Problem(f"row {index + 1} has {_count(len(row), 'value')} for {_count(width, 'column')} "
                               f"of `{table.name}`")
        if columns:
            omitted = [n for n in names if n not in columns]
            defaults = self.default_values(statement, table, omitted, len(rows))
            order = [columns.index(n) if n in columns else -1 - omitted.index(n) for n in names]
            rows = [tuple(row[i] if i >= 0 else default[-1 - i] for i in order) for row, default in zip(rows, defaults)]
        self.rows.setdefault(table.name, []).extend(rows)

    def dump(self) -> Dump:
        tables = list(self.tables.values())
        by_name = {t.name: t for t in tables}
        for table in tables:
            for key in table.foreign_keys:  # REFERENCES t without columns means t's primary key
                if not key.ref_columns:
                    target = by_name.get(key.ref_table)
                    key.ref_columns = list(target.primary_key) if target and target.primary_key else list(key.columns)
            width = len(table.columns)  # rows loaded before an ADD COLUMN get NULL there
            if table.name in self.rows and any(len(row) < width for row in self.rows[table.name]):
                self.rows[table.name] = [row + (None,) * (width - len(row)) for row in self.rows[table.name]]
        views = {name: sql for name, sql in self.views.items() if name in by_name}
        return Dump(tables, self.rows, self.skipped, views)


_NO_DEFAULT, _NUMBERED, _NOT_CONSTANT = object(), object(), object()  # see Reader.defaults
_SERIAL_TYPES = {exp.DataType.Type.SERIAL, exp.DataType.Type.SMALLSERIAL, exp.DataType.Type.BIGSERIAL}


def _target(target: exp.Expression) -> tuple[str, list[str] | None]:
    """An INSERT's table name and its column list (None: all columns)."""
    return _table_name(target), _names(target.expressions) if isinstance(target, exp.Schema) else None


@functools.lru_cache(maxsize=256)
def _insert_target(head: str, dialect: str) -> tuple[str, list[str] | None]:
    """The table and columns of `INSERT INTO t (a, b) VALUES`, read by sqlglot once per distinct head."""
    try:
        insert = sqlglot.parse_one(head + " (NULL)", read=dialect)
    except (sqlglot.errors.ParseError, sqlglot.errors.TokenError) as error:
        raise _Problem(f"{dialect} cannot read it: {_short_error(error)}") from None
    return _target(_stored_names(insert, dialect).this)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _unquote(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] + name[-1] in ('""', "``", "[]"):
        return name[1:-1]
    return name


def _short_error(error: Exception, line: int = 0) -> str:
    """sqlglot's message without its ANSI-underlined echo of the statement, on the dump's line."""
    errors = getattr(error, "errors", None)
    if errors:
        first = errors[0]
        near = (first.get("highlight") or "").strip()
        return f"{first.get('description', error)}" + (f" near `{near}`" if near else "") + (
            f" on line {line + first['line'] - 1}" if line and first.get("line") else "")
    return str(error).split("\n")[0][:200]


# -- row values: literal-only VALUES lists are read with one regular expression (sqlglot reads a
# few thousand rows a second; a dump has millions); anything else goes through sqlglot.

_IDENT = r'(?:"[^"]*(?:""[^"]*)*"|`[^`]*(?:``[^`]*)*`|\[[^\]]*\]|[\w$]+)'
_INSERT_HEAD = re.compile(rf"\s*(?:INSERT|REPLACE)\s+(?:(?:IGNORE|OR\s+\w+|LOW_PRIORITY|DELAYED|HIGH_PRIORITY)\s+)?"
                          rf"(?:INTO\s+)?{_IDENT}(?:\s*\.\s*{_IDENT})*\s*(?:\(\s*{_IDENT}(?:\s*,\s*{_IDENT})*\s*\))?\s*"
                          rf"VALUES\b", re.IGNORECASE)
_CREATED_NAME = re.compile(rf"CREATE\s+(?:\w+\s+)*?(?:TABLE|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?"
                           rf"(?P<name>{_IDENT}(?:\s*\.\s*{_IDENT})*)", re.IGNORECASE)
_PARTITION = re.compile(rf"CREATE\s+(?:\w+\s+)*?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(?P<child>{_IDENT}(?:\.{_IDENT})?)"
                        rf"\s+PARTITION\s+OF\s+(?P<parent>{_IDENT}(?:\.{_IDENT})?)", re.IGNORECASE)
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


def _value_patterns(backslash: bool) -> tuple[re.Pattern, re.Pattern]:
    """(one value or parenthesis, with a group per kind; a whole `(...), (...)` list of literal rows)."""
    string = r"'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'" if backslash else r"'[^']*(?:''[^']*)*'"
    number, word, hexadecimal = rf"{_NUMBER}(?![\w.])", r"(?:NULL|TRUE|FALSE)\b", r"[xX]'[0-9a-fA-F]*'"
    value = rf"(?:{string}|{number}|{word}|{hexadecimal})"
    row = rf"\(\s*(?:{value}\s*(?:,\s*{value}\s*)*)?\)"
    tokens = rf"({string})|({number})|({word})|[xX]'([0-9a-fA-F]*)'|([()])"
    return (re.compile(tokens, re.IGNORECASE | re.DOTALL),
            re.compile(rf"\s*{row}(?:\s*,\s*{row})*\s*", re.IGNORECASE | re.DOTALL))


_VALUES = {True: _value_patterns(True), False: _value_patterns(False)}
_MYSQL_ESCAPE = re.compile(r"\\(.)|''", re.DOTALL)
_MYSQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a", "%": "\\%", "_": "\\_"}
_WORDS = {"NULL": None, "TRUE": True, "FALSE": False}


def _mysql_unescape(match: re.Match) -> str:
    return _MYSQL_ESCAPES.get(match.group(1), match.group(1)) if match.group(1) else "'"


def literal_rows(sql: str, start: int, dialect: str) -> list[tuple] | None:
    """The rows of `VALUES (...), (...)` from `start` when every value is a literal, else None. One
    regular expression checks the whole list; the values are then taken in order (commas and spaces
    between them are all that findall passes over)."""
    backslash = dialect in ("mysql", "bigquery")
    tokens, row_list = _VALUES[backslash]
    if not row_list.fullmatch(sql, start):
        return None
    rows, row = [], []
    for string, number, word, hexadecimal, paren in tokens.findall(sql, start):
        if string:
            text = string[1:-1]
            if backslash and ("\\" in text or "''" in text):
                text = _MYSQL_ESCAPE.sub(_mysql_unescape, text)
            elif "''" in text:
                text = text.replace("''", "'")
            row.append(text)
        elif number:
            try:
                row.append(int(number))
            except ValueError:
                row.append(float(number))
        elif word:
            row.append(_WORDS[word.upper()])
        elif paren == "(":
            row = []
        elif paren == ")":
            rows.append(tuple(row))
        else:
            row.append(bytes.fromhex(hexadecimal))
    return rows


def _constant(value: exp.Expression, dialect: str):
    """A VALUES item as a Python value; anything but a constant is a problem."""
    if isinstance(value, exp.Introducer):  # MySQL's _utf8mb4'text'
        return _constant(value.expression, dialect)
    if isinstance(value, exp.Cast):
        inner = _constant(value.this, dialect)
        if isinstance(inner, str) and inner.startswith("\\x") and sqlite_type(value.to, "postgres") == "BLOB":
            return bytes.fromhex(inner[2:])  # PostgreSQL's '\x0102'::bytea
        return inner
    if isinstance(value, exp.Neg):
        number = _constant(value.this, dialect)
        if isinstance(number, (int, float)):
            return -number
    elif isinstance(value, exp.Null):
        return None
    elif isinstance(value, exp.Boolean):
        return value.this
    elif isinstance(value, exp.HexString):
        return bytes.fromhex(value.this)
    elif isinstance(value, exp.Literal):
        if value.is_string:
            return value.this
        return int(value.this) if re.fullmatch(r"[-+]?\d+", value.this) else float(value.this)
    elif isinstance(value, (exp.ByteString, exp.RawString, exp.National)):
        return value.this
    raise _Problem(f"the value `{value.sql(dialect=dialect)[:40]}` is not a constant; rows must be written as "
                   "literal values")


_COPY_ESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))", re.DOTALL)
_COPY_CHARS = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _copy_text(field: str) -> str:
    """A field of COPY's text format with its backslash escapes decoded."""
    if "\\" not in field:
        return field
    return _COPY_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)) if m.group(1) else chr(int(m.group(2), 16))
                            if m.group(2) else _COPY_CHARS.get(m.group(3), m.group(3)), field)


def _copy_value(field: str, kind: str):
    """A COPY field as the Python value of its column's type (COPY writes every value as text)."""
    if field == "\\N":
        return None
    text = _copy_text(field)
    try:
        if kind == "INTEGER":
            return int(text)
        if kind == "REAL" or kind.startswith("NUMERIC"):
            return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)
        if kind == "BOOLEAN":
            return {"t": True, "f": False}.get(text, text)
        if kind == "BLOB" and text.startswith("\\x"):
            return bytes.fromhex(text[2:])
    except ValueError:
        pass
    return text


# ---------------------------------------------------------------------------------------------
# 3. Types

def _type_set(*names: str) -> set:
    return {getattr(exp.DataType.Type, name) for name in names if hasattr(exp.DataType.Type, name)}


_TYPES = [
    ("INTEGER", _type_set("INT", "BIGINT", "SMALLINT", "TINYINT", "MEDIUMINT", "UINT", "UBIGINT", "USMALLINT",
                          "UTINYINT", "UMEDIUMINT", "INT128", "INT256", "UINT128", "UINT256", "HUGEINT", "UHUGEINT",
                          "YEAR", "SERIAL", "BIGSERIAL", "SMALLSERIAL", "BIT")),
    ("REAL", _type_set("FLOAT", "DOUBLE")),
    ("NUMERIC", _type_set("DECIMAL", "UDECIMAL", "BIGDECIMAL", "MONEY", "SMALLMONEY", "DECIMAL32", "DECIMAL64",
                          "DECIMAL128", "DECIMAL256")),
    ("VARCHAR", _type_set("VARCHAR", "NVARCHAR")),
    ("TEXT", _type_set("TEXT")),
    ("CHAR", _type_set("CHAR", "NCHAR")),
    ("DATE", _type_set("DATE", "DATE32")),
    ("DATETIME", _type_set("DATETIME", "DATETIME2", "DATETIME64", "SMALLDATETIME", "TIMESTAMP", "TIMESTAMPTZ",
                           "TIMESTAMPLTZ", "TIMESTAMPNTZ", "TIMESTAMP_S", "TIMESTAMP_MS", "TIMESTAMP_NS")),
    ("TIME", _type_set("TIME", "TIMETZ")),
    ("BOOLEAN", _type_set("BOOLEAN")),
    ("BLOB", _type_set("BINARY", "VARBINARY", "BLOB", "LONGBLOB", "MEDIUMBLOB", "TINYBLOB", "IMAGE")),
    ("JSON", _type_set("JSON", "JSONB")),
]


def _affinity(name: str) -> str:
    """SQLite's rule for a type name it does not know (https://sqlite.org/datatype3.html, 3.1)."""
    upper = name.upper()
    if "INT" in upper:
        return "INTEGER"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in upper:
        return "BLOB"
    if any(word in upper for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def sqlite_type(kind: exp.DataType | None, dialect: str, named: dict[str, str] | None = None) -> str:
    """A column type as a SQLite-style name, the same for the same type in every dialect."""
    if not isinstance(kind, exp.DataType):
        return "TEXT"
    params = [p.name for p in kind.expressions if isinstance(p, exp.DataTypeParam)]
    numbers = params and all(p.isdigit() for p in params)
    if kind.this == exp.DataType.Type.USERDEFINED:
        name = kind.sql(dialect=dialect).split(".")[-1].strip('"`[]')
        if name.lower() in (named or {}):
            return named[name.lower()]
        return _affinity(name) if dialect == "sqlite" else "TEXT"
    if kind.this == exp.DataType.Type.BIT and (params == ["1"] or dialect == "tsql"):
        return "BOOLEAN"  # SQL Server's BIT is its boolean
    if dialect == "mysql" and params == ["1"] and kind.this in _type_set("TINYINT", "UTINYINT"):
        return "BOOLEAN"  # MySQL writes BOOLEAN as tinyint(1)
    for name, types in _TYPES:
        if kind.this in types:
            if name == "VARCHAR" and params and not numbers:
                return "TEXT"  # SQL Server's VARCHAR(MAX)
            if name == "TEXT" and numbers and len(params) == 1:
                return f"VARCHAR({params[0]})"  # DuckDB's and BigQuery's lengths on their text type
            if name in ("VARCHAR", "CHAR", "NUMERIC") and numbers:
                return f"{name}({','.join(params)})"
            if name == "CHAR":
                return "CHAR"
            return name
    return "TEXT"  # enums, sets, UUIDs, intervals, arrays, network addresses...


# ---------------------------------------------------------------------------------------------

def _text_problems(text: str) -> list[str]:
    """Characters no database reads: a NUL, a lone surrogate (each with its line)."""
    problems = []
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        problems.append(f"line {line}: a NUL character (\\x00); remove it (is this a binary file?)")
    surrogate = re.search("[\ud800-\udfff]", text)
    if surrogate:
        problems.append(f"line {text.count(chr(10), 0, surrogate.start()) + 1}: an invalid character "
                        f"(U+{ord(surrogate.group()):04X}, a lone surrogate); paste the text again")
    return problems


def parse_dump(text: str, dialect: str = "sqlite") -> Dump:
    """The tables, rows and skipped statements of a dump written in `dialect`. Raises DumpError
    listing every problem (DialectError for an unknown dialect)."""
    dialect = check_dialect(dialect)
    if not isinstance(text, str):
        raise DumpError([f"the schema must be text (a string), not {type(text).__name__}"])
    if len(text) > MAX_DUMP_CHARS:
        raise DumpError([f"the dump has {len(text):,} characters, more than {MAX_DUMP_CHARS:,}; dump the schema "
                         "with fewer rows (pg_dump --schema-only, mysqldump --no-data) or upload a database file"])
    problems = _text_problems(text)
    if problems:
        raise DumpError(problems)
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    reader, unclosed = Reader(dialect), None
    directive = re.search(r"^/\*!\d{5}", text, re.MULTILINE)
    if directive and dialect != "mysql":  # another dialect reads them as comments, and would read the rest wrongly
        line = text.count("\n", 0, directive.start()) + 1
        reader.problems.append(f"line {line} (`{first_words(text[directive.start():directive.start() + 200])}`): "
                               f"MySQL's /*!NNNNN ... */ directives ({dialect_hint(directive.group(), dialect)})")
    try:
        statements = split_dump(text, dialect)
    except _Unclosed as error:
        statements, unclosed = error.statements, error
    try:
        for statement in statements:
            reader.read(statement)
    finally:
        reader.close()
    ansi = dialect == "mysql" and re.search(r"SQL_MODE\s*=\s*'[^']*\bANSI", text, re.IGNORECASE)
    if ansi and reader.problems:
        line = text.count("\n", 0, ansi.start()) + 1
        reader.problems.insert(0, f"line {line} (`{first_words(ansi.group())}`): the dump sets SQL_MODE ANSI "
                                  "(mysqldump --compatible=ansi), so its names are in double quotes, which MySQL "
                                  "reads as strings; dump again without --compatible")
    if unclosed:
        hint = dialect_hint(text, dialect)
        reader.problems.append(f"line {unclosed.line} (`{unclosed.words}`): {unclosed.what} opened here is never "
                               "closed; close it"
                               + (f" ({hint})" if hint else ""))
    if reader.problems:
        raise DumpError(reader.problems)
    return reader.dump()
