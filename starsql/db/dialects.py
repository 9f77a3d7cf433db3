"""SQL dialects: the names the app accepts, translation between them, and the engine that checks each.

The model writes the SQLite SQL it was trained on; users read and run their own dialect. `translate`
is sqlglot's transpiler plus the project's fixes for what it gets wrong on that SQLite (each found by
bench/dialect_fidelity.py, which runs Spider dev's gold queries on real PostgreSQL and MariaDB
servers). The app cannot run the user's server to check an answer, so `to_engine` rewrites the
user's-dialect SQL for an embedded engine with the same meaning where it can, and NOT_VERIFIED says,
per dialect, what that check cannot see.
"""

import contextlib

import sqlglot
from sqlglot import exp

DIALECTS = ("sqlite", "postgres", "mysql", "duckdb", "tsql", "snowflake", "bigquery")
DEFAULT_DIALECT = "sqlite"

# The embedded engine that checks each dialect. SQLite checks only SQLite: it has no types to speak
# of (a declared INTEGER column keeps text), so it cannot show a typed dialect's errors or results.
# DuckDB checks the rest: its SQL grew from PostgreSQL's grammar (ILIKE, `::` casts, booleans, real
# DATE/TIMESTAMP types, strict typing, case-sensitive `=` and LIKE), sqlglot translates every dialect
# here into it, and ENGINE_SETTINGS make it divide integers and compare text as the dialect does. It
# is embedded like SQLite; no embeddable MySQL- or SQL Server-like engine exists.
ENGINE = {
    "sqlite": "sqlite",
    "postgres": "duckdb",
    "mysql": "duckdb",
    "duckdb": "duckdb",
    "tsql": "duckdb",
    "snowflake": "duckdb",
    "bigquery": "duckdb",
}

# Statements to run on the DuckDB connection before checking SQL of that dialect: PostgreSQL and
# SQL Server divide integers to an integer (7 / 2 = 3), DuckDB by default to a float (3.5); MySQL's and
# SQL Server's default collations compare, group and sort text ignoring case, as DuckDB's NOCASE does.
ENGINE_SETTINGS = {
    "postgres": ("SET integer_division = true",),
    "mysql": ("SET default_collation = 'nocase'",),
    "tsql": ("SET integer_division = true", "SET default_collation = 'nocase'"),
}

# One sentence per dialect: what the embedded check cannot verify (shown with every checked answer).
NOT_VERIFIED = {
    "sqlite": "Checked by SQLite itself; only the limits of time and rows differ from your own database.",
    "postgres": "Checked by DuckDB, not PostgreSQL: PostgreSQL-only functions, a GROUP BY that relies "
                "on a primary key, and your server's collation, extensions and settings are not verified.",
    "mysql": "Checked by DuckDB, not MySQL: text compares ignoring case as under MySQL's default collation, "
             "but that collation's ignoring of accents and trailing spaces, MySQL's conversions of text to "
             "numbers and its loose GROUP BY are not verified.",
    "duckdb": "Checked by DuckDB itself; only the limits of time and rows differ from your own database.",
    "tsql": "Checked by DuckDB, not SQL Server: text compares ignoring case as under SQL Server's default "
            "collation, but accent and trailing-space rules and T-SQL-only functions are not verified.",
    "snowflake": "Checked by DuckDB, not Snowflake: Snowflake-only functions, semi-structured types "
                 "(VARIANT) and its number precision rules are not verified.",
    "bigquery": "Checked by DuckDB, not BigQuery: BigQuery-only functions, project.dataset names, "
                "STRUCT/ARRAY details and its NUMERIC precision are not verified.",
}

# Dialects whose LIKE is case-sensitive, unlike SQLite's (ASCII case-insensitive) LIKE. MySQL and
# SQL Server compare case-insensitively under their default collations, so their LIKE already agrees.
_CASE_SENSITIVE_LIKE = {"postgres", "duckdb", "snowflake", "bigquery"}
_HAS_ILIKE = {"postgres", "duckdb", "snowflake"}
# Comparisons whose right side SQLite reads as a string when it is a "double-quoted" name of no column.
_VALUE_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike)
# Dialects whose `/` of two integers is a fraction (7 / 2 = 3.5), where SQLite's is an integer
# truncated toward zero (3; -7 / 2 = -3). PostgreSQL's and SQL Server's `/` already truncates.
_FRACTIONAL_INTEGER_DIVISION = {"mysql", "duckdb", "snowflake", "bigquery"}
# How servers store a name written without quotes (the others keep it as written).
_FOLDS_BARE_NAMES = {"postgres": str.lower, "snowflake": str.upper}


class DialectError(ValueError):
    pass


def check_dialect(name) -> str:
    """`name` as sqlglot spells it, or DialectError saying which names work."""
    if isinstance(name, str) and name.strip().lower() in DIALECTS:
        return name.strip().lower()
    raise DialectError(f"Unknown SQL dialect {name!r}: choose one of {', '.join(DIALECTS)}.")


@contextlib.contextmanager
def _not_too_deep():
    """sqlglot reads and writes SQL by recursion: SQL nested thousands of levels deep exhausts Python's
    stack (RecursionError), which must reach the user as a DialectError, not a crash."""
    try:
        yield
    except RecursionError:
        raise DialectError("This SQL is nested too deeply to read (thousands of parentheses or subqueries): "
                           "write it with fewer levels of nesting.") from None


def _parse(sql: str, read: str) -> list[exp.Expression]:
    try:
        with _not_too_deep():
            return [tree for tree in sqlglot.parse(sql, read=read) if tree is not None]
    except sqlglot.errors.SqlglotError as error:
        message = str(error).splitlines()[0][:300]
        raise DialectError(f"Cannot read this SQL as {read}: {message}. Check that it is {read} SQL, "
                           f"or choose the dialect it is written in.") from None


def _double_quoted_strings(tree: exp.Expression, columns: set[str] | None) -> None:
    """SQLite reads `name = "France"` as a string when no column is called France; Spider's SQL and the
    model rely on it, while every other dialect reads a name. Given the schema's `columns`, any such
    name of no column becomes a string; without them, only the right side of a comparison or IN list."""
    aliases = {alias.alias.lower() for alias in tree.find_all(exp.Alias)}  # `ORDER BY "total"` names an output
    for column in list(tree.find_all(exp.Column)):
        if column.table or not column.this.quoted or column.name.lower() in aliases:
            continue
        if columns is not None:
            is_value = column.name.lower() not in columns
        else:
            parent = column.parent
            is_value = (isinstance(parent, _VALUE_COMPARISONS) and parent.expression is column) or (
                isinstance(parent, exp.In) and column in parent.expressions)
        if is_value:
            column.replace(exp.Literal.string(column.name))


def _case_insensitive_like(tree: exp.Expression, write: str) -> None:
    """SQLite's LIKE ignores ASCII case; PostgreSQL's, DuckDB's, Snowflake's and BigQuery's do not."""
    for like in list(tree.find_all(exp.Like)):
        if write in _HAS_ILIKE:
            like.replace(exp.ILike(this=like.this, expression=like.expression))
        else:
            like.replace(exp.Like(this=exp.Lower(this=like.this), expression=exp.Lower(this=like.expression)))


def _derived_limit_subqueries(tree: exp.Expression) -> None:
    """MySQL/MariaDB refuse LIMIT in an IN/ANY/ALL subquery; in a derived table inside it they accept it."""
    for node in list(tree.find_all(exp.In, exp.Any, exp.All)):
        key = "query" if isinstance(node, exp.In) else "this"
        query = node.args.get(key)
        query = query.unnest() if query is not None else None
        if isinstance(query, exp.Query) and query.args.get("limit"):
            derived = exp.select("*").from_(exp.Subquery(this=query.copy(), alias=exp.TableAlias(
                this=exp.to_identifier("limited"))))
            node.set(key, exp.Subquery(this=derived) if key == "query" else derived)


def sqlite_affinity(type_name: str) -> str:
    """SQLite's affinity of a declared type (its documented rules, in order); schemas here use such names."""
    upper = (type_name or "").upper()
    if "INT" in upper:
        return "integer"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if "BLOB" in upper or not upper:
        return "blob"
    if any(word in upper for word in ("REAL", "FLOA", "DOUB")):
        return "real"
    return "numeric"


class _Schema:
    """The user's tables, looked up as SQLite looks names up (case-insensitively), spelled as the target has them."""

    def __init__(self, tables: list, write: str):
        self.tables = {table.name.lower(): table for table in tables}
        self.columns = {column.name.lower() for table in tables for column in table.columns}
        self.write = write

    def needs_quotes(self, name: str) -> bool:
        """PostgreSQL folds bare names to lower case, Snowflake to upper case: a name that is not must be
        quoted. (pg_dump, the catalog and parse_dump spell names as the server stores them.)"""
        fold = _FOLDS_BARE_NAMES.get(self.write)
        return fold is not None and name != fold(name)

    def identifier(self, name: str) -> exp.Identifier:
        identifier = exp.to_identifier(name)
        identifier.set("quoted", identifier.quoted or self.needs_quotes(name))
        return identifier

    def column_type(self, table_name: str | None, column_name: str) -> str | None:
        table = self.tables.get((table_name or "").lower())
        for column in table.columns if table else ():
            if column.name.lower() == column_name.lower():
                return column.type
        return None


def _resolve(tree: exp.Expression, schema: "_Schema | None") -> dict[int, str]:
    """Fix each name's spelling to the schema's (MySQL's table names and PostgreSQL's quoted names are
    case-sensitive; SQLite's are not) and each table qualifier to its alias's spelling; return the
    declared type of each column found, by id(), for the comparisons below."""
    from sqlglot.optimizer.scope import traverse_scope

    types, done = {}, set()
    for scope in traverse_scope(tree):  # innermost first; a correlated name is left to the scope that has it
        sources = {}  # lower-case alias or name -> (its identifier as the query must spell it, schema table or None)
        for alias, source in scope.sources.items():
            table_name = None
            if isinstance(source, exp.Table) and schema and source.name.lower() in schema.tables:
                table_name = schema.tables[source.name.lower()].name
                if source.name != table_name or schema.needs_quotes(table_name):
                    source.set("this", schema.identifier(table_name))
            spelled = source.alias if isinstance(source, exp.Table) and source.alias else (
                table_name if table_name else alias)
            qualifier = schema.identifier(spelled) if schema and spelled == table_name else exp.to_identifier(spelled)
            sources[alias.lower()] = (qualifier, table_name)
        for column in scope.columns:
            if id(column) in done:
                continue
            if column.table:
                if column.table.lower() not in sources:
                    continue
                qualifier, table_name = sources[column.table.lower()]
                if qualifier.name != column.table or qualifier.quoted and not column.args["table"].quoted:
                    column.set("table", qualifier.copy())
                candidates = [table_name]
            else:
                candidates = [name for _, name in sources.values() if name]
            found = [(name, schema.column_type(name, column.name)) for name in candidates if name and schema]
            found = [(name, type_) for name, type_ in found if type_ is not None]
            if column.table or len(found) == 1:
                done.add(id(column))
            if len(found) == 1:
                table = schema.tables[found[0][0].lower()]
                exact = next(c.name for c in table.columns if c.name.lower() == column.name.lower())
                if schema.needs_quotes(exact) and (exact != column.name or not column.this.quoted):
                    column.set("this", schema.identifier(exact))
                types[id(column)] = found[0][1]
    return types


def _cast(node: exp.Expression, to: str) -> None:
    """Wrap `node` in CAST(node AS to) in place (the node itself stays in the tree: its type stays known)."""
    cast = exp.Cast(this=exp.null(), to=exp.DataType.build(to))
    node.replace(cast)
    cast.set("this", node)


def _number(node: exp.Expression) -> bool:
    inner = node.this if isinstance(node, exp.Neg) else node
    return isinstance(inner, exp.Literal) and not inner.is_string


def _text_against_numbers(tree: exp.Expression, types: dict[int, str]) -> None:
    """SQLite compares a text column with a number or any operand of no affinity (a literal, an aggregate,
    arithmetic) as text: `year = 2014` is `year = '2014'`; typed dialects refuse or compare numbers. Those
    operands become text. Against a numeric column SQLite compares numbers; for = and IN, casting the
    numeric side to text gives the same answer on the canonical integers such columns hold."""
    def affinity(node):
        node = node.unnest() if isinstance(node, exp.Paren) else node
        if isinstance(node, exp.Column):
            return sqlite_affinity(types[id(node)]) if id(node) in types else "unknown"
        if isinstance(node, exp.Cast):
            return sqlite_affinity(node.to.sql(dialect="sqlite"))
        if isinstance(node, exp.Subquery) and isinstance(node.this, exp.Select) and len(node.this.expressions) == 1:
            return affinity(node.this.expressions[0].unalias())
        if isinstance(node, exp.Literal) and node.is_string:
            return "text"
        return None

    def align(node, other, equality: bool):
        if affinity(node) != "text":
            return
        if _number(other):
            other.replace(exp.Literal.string(other.sql(dialect="sqlite")))
        elif affinity(other) is None and not isinstance(other, exp.Null) or (
                equality and affinity(other) in ("integer", "real", "numeric")):
            _cast(other, "TEXT")

    for comparison in list(tree.find_all(exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)):
        equality = isinstance(comparison, (exp.EQ, exp.NEQ))
        align(comparison.this, comparison.expression, equality)
        align(comparison.expression, comparison.this, equality)
    for between in list(tree.find_all(exp.Between)):
        for bound in (between.args.get("low"), between.args.get("high")):
            if bound is not None:
                align(between.this, bound, False)
    for in_ in list(tree.find_all(exp.In)):
        for value in list(in_.expressions):
            align(in_.this, value, True)
        query = in_.args.get("query")
        query = query.unnest() if query is not None else None
        if isinstance(query, exp.Select) and len(query.expressions) == 1:
            picked = query.expressions[0].unalias()
            align(in_.this, picked, True)
            align(picked, in_.this, True)


def _numeric_aggregates_of_text(tree: exp.Expression, types: dict[int, str], write: str) -> None:
    """SQLite's AVG and SUM read numbers out of text; typed dialects refuse text (MySQL converts, as SQLite)."""
    if write == "mysql":
        return
    for aggregate in list(tree.find_all(exp.Avg, exp.Sum)):
        argument = aggregate.this
        if id(argument) in types and sqlite_affinity(types[id(argument)]) == "text":  # a column of text
            _cast(argument, "DOUBLE")


def _is_integer(node: exp.Expression, types: dict[int, str]) -> bool:
    """Whether SQLite computes `node` as an integer: a column declared integer, an integer literal, or
    sums, products, SUM/MIN/MAX and COUNT of those."""
    node = node.unnest() if isinstance(node, exp.Paren) else node
    if isinstance(node, exp.Column):
        return id(node) in types and sqlite_affinity(types[id(node)]) == "integer"
    if isinstance(node, exp.Literal):
        return not node.is_string and node.is_int
    if isinstance(node, exp.Cast):
        return sqlite_affinity(node.to.sql(dialect="sqlite")) == "integer"
    if isinstance(node, (exp.IntDiv, exp.Count)):
        return True
    if isinstance(node, (exp.Neg, exp.Abs, exp.Sum, exp.Min, exp.Max)) and not isinstance(node.parent, exp.Window):
        return _is_integer(node.this, types)
    if isinstance(node, (exp.Add, exp.Sub, exp.Mul, exp.Mod)):
        return _is_integer(node.this, types) and _is_integer(node.expression, types)
    return False


def _integer_division(tree: exp.Expression, types: dict[int, str], write: str) -> None:
    """SQLite divides two integers to an integer, truncated toward zero (7 / 2 = 3, -7 / 2 = -3); MySQL,
    DuckDB, Snowflake and BigQuery give 3.5. Their integer division (DIV, //, TRUNC, DIV()) truncates
    too; a division by zero stays NULL, as in SQLite (MySQL's DIV 0 is NULL; the others fail)."""
    if write not in _FRACTIONAL_INTEGER_DIVISION:
        return
    for division in reversed(list(tree.find_all(exp.Div, bfs=False))):  # the inner ones first: `a / b / c`
        if _is_integer(division.this, types) and _is_integer(division.expression, types):
            divisor = division.expression
            if write != "mysql":
                divisor = exp.Nullif(this=divisor, expression=exp.Literal.number(0))
            division.replace(exp.IntDiv(this=division.this, expression=divisor))


def _aggregates(select: exp.Select) -> list[exp.AggFunc]:
    """The aggregates that make `select` a grouped query (not a subquery's, not a window function's)."""
    return [node for projection in select.expressions for node in projection.find_all(exp.AggFunc)
            if node.find_ancestor(exp.Select) is select and not isinstance(node.parent, exp.Window)]


def _bare_columns(select: exp.Select, keys: list[exp.Expression]):
    """Columns shown or sorted on by a grouped `select` that are neither grouping keys nor aggregated."""
    grouped = {key.sql(dialect="sqlite").lower() for key in keys}
    outputs = {projection.alias_or_name.lower() for projection in select.expressions}
    order = select.args.get("order")

    def is_key(column: exp.Column) -> bool:  # `T1.id` and `id` name the same key
        return any(isinstance(key, exp.Column) and key.name.lower() == column.name.lower() and (
            not key.table or not column.table or key.table.lower() == column.table.lower()) for key in keys)

    for expression in select.expressions + (order.expressions if order else []):
        for column in list(expression.find_all(exp.Column)):
            if column.find_ancestor(exp.Select) is not select or column.find_ancestor(exp.AggFunc, exp.Window):
                continue  # another query's column, or aggregated
            if is_key(column) or any(node.sql(dialect="sqlite").lower() in grouped
                                     for node in (column, *_ancestors(column, expression))):
                continue  # a grouping key, or inside one (`GROUP BY strftime('%Y', d)`)
            if isinstance(expression, exp.Ordered) and not column.table and column.name.lower() in outputs:
                continue  # ORDER BY an output column's name
            yield column


def _ancestors(node: exp.Expression, stop: exp.Expression):
    while node is not stop and node.parent is not None:
        node = node.parent
        yield node


def _lone_extreme(select: exp.Select) -> exp.Max | exp.Min | None:
    """The one MAX or MIN that is a whole output column of `select`, its only aggregate, if so."""
    aggregates = _aggregates(select)
    order = select.args.get("order")
    if len(aggregates) != 1 or not isinstance(aggregates[0], (exp.Max, exp.Min)) or order and order.find(exp.AggFunc):
        return None
    extreme = aggregates[0]
    return extreme if extreme.parent is select or isinstance(extreme.parent, exp.Alias) else None


def _written(function: exp.Func, sql: str) -> str:
    """`function`'s call as written in `sql` (SQLite names an unaliased output column so), found from
    where the parser saw its name to the matching parenthesis; sqlglot's text of it if not found."""
    start = function.meta.get("start")
    depth = 0
    for token in sqlglot.Dialect.get_or_raise("sqlite").tokenize(sql) if start is not None else ():
        if token.start < start:
            continue
        depth += {sqlglot.TokenType.L_PAREN: 1, sqlglot.TokenType.R_PAREN: -1}.get(token.token_type, 0)
        if depth == 0 and token.token_type == sqlglot.TokenType.R_PAREN:
            return sql[start:token.end + 1]
    return function.sql(dialect="sqlite", normalize_functions="lower")


def _row_of_the_extreme(tree: exp.Expression, sql: str) -> exp.Expression:
    """SQLite's `SELECT name, MAX(age) FROM t [GROUP BY g]` shows the name of the row holding the max
    (of each group); other dialects refuse the bare column or show any row's. Without GROUP BY that is
    `ORDER BY age DESC LIMIT 1`; with it, over one table, the first row of each group ranked by age
    (ROW_NUMBER). NULLs rank last, as MAX and MIN skip them. The aggregate's output keeps its name
    (`max(age)`, not `age`). Without GROUP BY, SQLite shows one row of NULLs when no row matches: the
    rewritten query is LEFT JOINed onto one row. Grouped queries over joins are left as they are."""
    for select in list(tree.find_all(exp.Select)):
        extreme = _lone_extreme(select)
        if (extreme is None or any(select.args.get(arg) for arg in ("having", "distinct"))
                or not any(p.find(exp.Column) for p in select.expressions if not p.find(exp.AggFunc))):
            continue
        keys = select.args["group"].expressions if select.args.get("group") else []
        source = select.args["from_"].this if select.args.get("from_") else None
        if not keys and (select.args.get("order") or select.args.get("limit")) or keys and (
                select.args.get("joins") or not isinstance(source, exp.Table)
                or not all(isinstance(key, exp.Column) for key in keys)):
            continue
        value = extreme.this
        rank = exp.Ordered(this=value.copy(), desc=isinstance(extreme, exp.Max), nulls_first=False)
        if extreme.parent is select:  # unaliased: named as SQLite names it, by its text
            extreme.replace(exp.alias_(value, _written(extreme, sql), quoted=True))
        else:
            extreme.replace(value)
        if not keys:
            outer = _one_row_at_least(select.order_by(rank, copy=False).limit(1, copy=False))
            tree = outer if select is tree else tree
            continue
        window = exp.Window(this=exp.RowNumber(), partition_by=[key.copy() for key in keys],
                            order=exp.Order(expressions=[rank]))
        every_column = exp.Column(this=exp.Star(), table=exp.to_identifier(source.alias_or_name))
        ranked = exp.select(every_column, exp.alias_(window, "extreme_rank")).from_(source.copy())
        if select.args.get("where"):
            ranked.set("where", select.args["where"].copy())
        for column in select.find_all(exp.Column):
            if column.find_ancestor(exp.Select) is select:
                column.set("table", None)  # the outer query reads the ranked rows
        alias = exp.TableAlias(this=exp.to_identifier("ranked"))
        select.set("from_", exp.From(this=exp.Subquery(this=ranked, alias=alias)))
        select.set("where", exp.Where(this=exp.column("extreme_rank").eq(1)))
        select.set("group", None)
    return tree


def _one_row_at_least(select: exp.Select) -> exp.Select:
    """`select` replaced (in place, and returned) by `SELECT extreme_row.* FROM (SELECT 1) AS one_row LEFT JOIN (select) AS
    extreme_row ON TRUE`: its row, or one row of NULLs where it has none."""
    inner = select.copy()
    with_ = inner.args.get("with_")
    inner.set("with_", None)  # the CTEs stay on the outer query, where they are visible to the inner
    outer = exp.select(exp.Column(this=exp.Star(), table=exp.to_identifier("extreme_row"))).from_(
        exp.Subquery(this=exp.select("1"), alias=exp.TableAlias(this=exp.to_identifier("one_row")))).join(
        exp.Subquery(this=inner, alias=exp.TableAlias(this=exp.to_identifier("extreme_row"))),
        join_type="LEFT", on=exp.true())
    if with_ is not None:
        outer.set("with_", with_)
    select.replace(outer)
    return outer


def _bare_grouped_columns(tree: exp.Expression) -> None:
    """SQLite lets a grouped query show a column that is neither grouped nor aggregated (Spider's gold
    does: `SELECT T2.name ... GROUP BY T1.id`); PostgreSQL (unless it is the table's key) and MySQL
    with ONLY_FULL_GROUP_BY refuse it. Where the column has one value per group, MIN() of it is that
    value. Not when the only aggregate is one MIN or MAX: then SQLite takes that row's value, which
    MIN() would not give, so the query is left to fail rather than answer differently."""
    for select in list(tree.find_all(exp.Select)):
        keys = select.args["group"].expressions if select.args.get("group") else []
        aggregates = _aggregates(select)
        if not keys and not aggregates or len(aggregates) == 1 and isinstance(aggregates[0], (exp.Max, exp.Min)):
            continue
        for column in list(_bare_columns(select, keys)):
            least = exp.Min(this=column.copy())
            column.replace(exp.alias_(least, column.name) if column.parent is select else least)  # keeps its name


def _aliased_derived_tables(tree: exp.Expression) -> None:
    """PostgreSQL (before 16) and MySQL require an alias on a subquery in FROM; SQLite does not."""
    for subquery in list(tree.find_all(exp.Subquery)):
        if not subquery.alias and isinstance(subquery.parent, (exp.From, exp.Join)):
            subquery.set("alias", exp.TableAlias(this=exp.to_identifier("derived")))


def _float_averages(tree: exp.Expression) -> None:
    """SQLite's AVG is a float; MySQL's AVG of integers or decimals keeps 4 decimal digits (12.3333)."""
    for average in list(tree.find_all(exp.Avg)):
        if not isinstance(average.this, exp.Cast):
            _cast(average.this, "DOUBLE")


def translate(sql: str, write: str, read: str = "sqlite", schema: list | None = None) -> str:
    """`sql`, written in `read`'s dialect, in `write`'s (statements joined by ";\n").

    `schema` (optional: the database's starsql.schema.Table list, names spelled as the database has
    them) lets the SQLite fixes know names and types: table names spelled as the target needs them,
    "double-quoted" strings told exactly from quoted column names, text columns compared with numbers
    as SQLite compares them. Without it a heuristic finds the double-quoted strings.
    DialectError if `sql` cannot be read as `read`."""
    write, read = check_dialect(write), check_dialect(read)
    if read == write:
        return sql
    known = _Schema(schema, write) if schema else None
    out = []
    for tree in _parse(sql, read):
        with _not_too_deep():
            try:
                out.append(_fixed(tree.copy(), write, read, known, sql).sql(dialect=write))
            except Exception:  # a fix that cannot handle some tree must not make the answer worse than sqlglot's
                out.append(tree.sql(dialect=write))
    return ";\n".join(out)


def _fixed(tree: exp.Expression, write: str, read: str, known: "_Schema | None", sql: str) -> exp.Expression:
    """`tree` (read from `sql`) with the project's fixes for `read` -> `write` applied (in place)."""
    if read == "sqlite":
        _double_quoted_strings(tree, known.columns if known else None)
        types = _resolve(tree, known)
        _text_against_numbers(tree, types)
        _numeric_aggregates_of_text(tree, types, write)
        _integer_division(tree, types, write)
        tree = _row_of_the_extreme(tree, sql)
        _bare_grouped_columns(tree)
        _aliased_derived_tables(tree)
        if write in _CASE_SENSITIVE_LIKE:
            _case_insensitive_like(tree, write)
        if write == "mysql":
            _float_averages(tree)
    if write == "mysql":
        _derived_limit_subqueries(tree)
    return tree


def to_engine(sql: str, dialect: str) -> str:
    """The user's-`dialect` SQL as ENGINE[dialect] runs it with the same meaning (run ENGINE_SETTINGS
    first). MySQL's and SQL Server's LIKE ignore case under their default collations: ILIKE in DuckDB."""
    dialect = check_dialect(dialect)
    engine = ENGINE[dialect]
    if engine == dialect:
        return sql
    out = []
    for tree in _parse(sql, dialect):
        with _not_too_deep():
            if dialect in ("mysql", "tsql"):
                for like in list(tree.find_all(exp.Like)):
                    like.replace(exp.ILike(this=like.this, expression=like.expression))
            out.append(tree.sql(dialect=engine))
    return ";\n".join(out)


def format_sql(sql: str, dialect: str) -> str:
    """`sql` pretty-printed in `dialect`; as given when sqlglot cannot read it (the check says why)."""
    try:
        trees = [tree for tree in sqlglot.parse(sql, read=check_dialect(dialect)) if tree is not None]
        return ";\n".join(tree.sql(dialect=dialect, pretty=True) for tree in trees) if trees else sql
    except (sqlglot.errors.SqlglotError, RecursionError):
        return sql
