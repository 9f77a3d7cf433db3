"""Whether a prediction is right: execution match the test-suite way, and exact match.

Execution match follows the test-suite evaluator (taoyds/test-suite-sql-eval): result rows are
compared as multisets, row order only when the gold query ends in ORDER BY, and columns may come
in any order. By default DISTINCT is removed from both queries before they run, as that
evaluator does unless given --keep_distinct (published Spider execution accuracies use its
default). Exact match compares both queries as text after sqlglot normalises them.
"""

import re
from collections import Counter
from collections.abc import Iterator

from .spider import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S, Database, Outcome

GOLD_TIMEOUT_S = 60.0  # gold queries are trusted; a slow machine must not fail them
MAX_COLUMN_PERMUTATIONS = 1_000

_SIMPLE_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def _column_matchings(candidates: list[list[int]], limit: int) -> Iterator[tuple[int, ...]]:
    """Permutations p with p[i] in candidates[i], identity first when allowed, at most `limit`."""
    chosen: list[int] = []
    used: set[int] = set()
    count = 0

    def extend(i: int) -> Iterator[tuple[int, ...]]:
        nonlocal count
        if i == len(candidates):
            count += 1
            yield tuple(chosen)
            return
        for j in candidates[i]:
            if j not in used and count < limit:
                chosen.append(j)
                used.add(j)
                yield from extend(i + 1)
                chosen.pop()
                used.discard(j)

    yield from extend(0)


def results_match(gold: list[tuple], predicted: list[tuple], order_matters: bool) -> bool:
    """True when some column order of `predicted` gives the same rows as `gold` (as a bag, or a list)."""
    if not gold and not predicted:
        return True
    if len(gold) != len(predicted) or len(gold[0]) != len(predicted[0]):
        return False
    width = len(gold[0])
    # A predicted column can only stand for a gold column holding the same bag of values.
    gold_columns = [Counter(row[i] for row in gold) for i in range(width)]
    predicted_columns = [Counter(row[j] for row in predicted) for j in range(width)]
    candidates = [[j for j in range(width) if predicted_columns[j] == gold_columns[i]] for i in range(width)]
    if not all(candidates):
        return False
    gold_bag = None if order_matters else Counter(gold)
    for permutation in _column_matchings(candidates, MAX_COLUMN_PERMUTATIONS):
        permuted = [tuple(row[j] for j in permutation) for row in predicted]
        if permuted == gold if order_matters else Counter(permuted) == gold_bag:
            return True
    return False


def remove_distinct(sql: str) -> str:
    """`sql` without its DISTINCT keywords: the test-suite evaluator's default before executing.

    Like its `remove_distinct` (which drops every token spelled DISTINCT from sqlparse's tokens),
    this cuts DISTINCT wherever it is a keyword: `SELECT DISTINCT` at any depth and inside
    aggregates (`count(DISTINCT x)` counts every row). Strings and quoted names stay as they are.
    Unlike it, `IS [NOT] DISTINCT FROM` (a comparison, not duplicate removal) is kept: without its
    DISTINCT the query would not run. The rest of the text is kept byte for byte (each keyword
    becomes a space), so nothing else a re-rendering could change reaches the database.
    SQL sqlglot cannot tokenize (an unterminated string) is returned unchanged: it cannot run either."""
    from sqlglot.dialects.sqlite import SQLite
    from sqlglot.tokens import TokenType

    try:
        tokens = SQLite().tokenize(sql)
    except Exception:  # sqlglot raises TokenError and, on odd input, others
        return sql
    cuts = [
        token for i, token in enumerate(tokens) if token.token_type == TokenType.DISTINCT
        and not (i + 1 < len(tokens) and tokens[i + 1].token_type == TokenType.FROM)  # IS [NOT] DISTINCT FROM
    ]
    for token in reversed(cuts):
        sql = sql[: token.start] + " " + sql[token.end + 1 :]
    return sql


def executed_sql(sql: str, keep_distinct: bool) -> str:
    """The text that runs for `sql`: as given with keep_distinct, else without DISTINCT (the default)."""
    return sql if keep_distinct else remove_distinct(sql)


def run_gold(database: Database, gold_sql: str, timeout: float = DEFAULT_TIMEOUT_S,
             max_rows: float = DEFAULT_MAX_ROWS) -> Outcome:
    """The gold query's result, with at least GOLD_TIMEOUT_S to compute it."""
    return database.run(gold_sql, timeout=max(timeout, GOLD_TIMEOUT_S), max_rows=max_rows)


def matches_gold(database: Database, gold_rows: list[tuple], ordered: bool, predicted_sql: str,
                 timeout: float = DEFAULT_TIMEOUT_S, max_rows: float = DEFAULT_MAX_ROWS,
                 keep_distinct: bool = False) -> tuple[bool, str | None]:
    """(match, error) for one prediction against gold rows already computed (`ordered`: see order_matters).

    The gold rows come from the gold query run the same way: without DISTINCT unless keep_distinct."""
    if not predicted_sql.strip():
        return False, "empty prediction"
    predicted = database.run(executed_sql(predicted_sql, keep_distinct), timeout=timeout, max_rows=max_rows)
    if predicted.error is not None:
        return False, predicted.error
    return results_match(gold_rows, predicted.rows, ordered), None


def execution_match(database: Database, gold_sql: str, predicted_sql: str, timeout: float = DEFAULT_TIMEOUT_S,
                    max_rows: int = DEFAULT_MAX_ROWS, keep_distinct: bool = False) -> tuple[bool, str | None]:
    """(match, error) for one prediction: its result against the gold query's, test-suite rules
    (DISTINCT removed from both first, unless keep_distinct)."""
    gold_sql = executed_sql(gold_sql, keep_distinct)
    gold = run_gold(database, gold_sql, timeout, max_rows)
    if gold.error is not None:
        return False, f"gold query failed: {gold.error}"
    return matches_gold(database, gold.rows, order_matters(gold_sql), predicted_sql, timeout, max_rows, keep_distinct)


def _parse(sql: str):
    """The one statement in `sql` as a sqlglot tree, or None when sqlglot cannot parse it."""
    import sqlglot

    try:
        statements = [s for s in sqlglot.parse(sql, read="sqlite") if s is not None]
    except Exception:  # sqlglot raises ParseError, TokenError and, on odd input, others
        return None
    return statements[0] if len(statements) == 1 else None


def order_matters(gold_sql: str) -> bool:
    """Row order counts only when the gold query sorts its result (ORDER BY at the top level)."""
    tree = _parse(gold_sql)
    if tree is None:
        return "order by" in " ".join(gold_sql.lower().split())
    return tree.args.get("order") is not None


def _unalias_tables(tree) -> None:
    """Rename table aliases to the table's own name (`name_2` for a second copy); drop them."""
    from sqlglot import exp
    from sqlglot.optimizer.scope import traverse_scope

    for scope in traverse_scope(tree):
        tables = [source for source in scope.sources.values() if isinstance(source, exp.Table)]
        seen: Counter = Counter()
        renames = {}
        for table in tables:
            seen[table.name] += 1
            renames[table.alias_or_name] = table.name if seen[table.name] == 1 else f"{table.name}_{seen[table.name]}"
        single = len(scope.sources) == 1
        for column in scope.columns:
            if column.table in renames:
                # In a one-table scope `singer.name` and `name` mean the same column.
                column.set("table", None if single else exp.to_identifier(renames[column.table]))
        for table in tables:
            new = renames[table.alias_or_name]
            table.set("alias", None if new == table.name else exp.TableAlias(this=exp.to_identifier(new)))


def _plain_text(sql: str) -> str:
    """Lower-cased, spaces squeezed, no trailing semicolon: the fallback comparison."""
    return " ".join(sql.lower().split()).rstrip(";").strip()


def normalize_sql(sql: str, columns: set[str] | None = None) -> str:
    """Canonical text of a query: sqlglot's SQLite rendering with identifiers lower-cased, table
    aliases resolved, `"value"` literals as 'value' (when `columns` tells them from quoted
    columns), INNER JOIN as JOIN, default ASC dropped. Unparseable SQL: lower-cased, spaces squeezed."""
    from sqlglot import exp
    from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

    tree = _parse(sql)
    if tree is None:
        return _plain_text(sql)
    try:
        if columns is not None:
            for column in list(tree.find_all(exp.Column)):
                # SQLite reads "France" as a string when no column has that name; Spider gold relies on it.
                if column.this.quoted and not column.table and column.name.lower() not in columns:
                    column.replace(exp.Literal.string(column.name))
        tree = normalize_identifiers(tree, dialect="sqlite")
        _unalias_tables(tree)
        for join in tree.find_all(exp.Join):
            if join.args.get("kind") == "INNER":
                join.set("kind", None)
        for ordered in tree.find_all(exp.Ordered):
            if not ordered.args.get("desc"):
                ordered.set("desc", None)
        for identifier in tree.find_all(exp.Identifier):
            if _SIMPLE_NAME.match(identifier.name):  # "singer" and singer name the same table
                identifier.set("quoted", False)
        return tree.sql(dialect="sqlite")
    except Exception:  # a tree sqlglot parsed but cannot rewrite: compare the plain rendering
        return _plain_text(sql)
