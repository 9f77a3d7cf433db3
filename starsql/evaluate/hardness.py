"""Spider's hardness levels (easy / medium / hard / extra), exactly as Spider's evaluation.py rates them.

Spider's dev.json carries each question's gold SQL already parsed into Spider's `sql` dict, so the
rating needs no SQL parser: these functions are a port of `count_component1`, `count_component2`,
`count_others` and `Evaluator.eval_hardness` from taoyds/spider evaluation.py, quirks included
(e.g. `count_agg` over a HAVING condition list also counts its 'and'/'or' strings), so the levels
match every published Spider breakdown.

The `sql` dict (JSON turns Spider's tuples into lists):
    select: [is_distinct, [[agg_id, val_unit], ...]]    val_unit: [unit_op, col_unit1, col_unit2]
    from: {table_units: [...], conds: condition}        col_unit: [agg_id, col_id, is_distinct]
    where / having: condition = [cond_unit, 'and'|'or', cond_unit, ...]
    cond_unit: [not_op, op_id, val_unit, val1, val2]     (val1/val2 may be a nested sql dict)
    groupBy: [col_unit, ...]   orderBy: [] or ['asc'|'desc', [val_unit, ...]]
    limit: None | int          intersect / union / except: None | sql dict
"""

LEVELS = ("easy", "medium", "hard", "extra")

WHERE_OPS = ("not", "between", "=", ">", "<", ">=", "<=", "!=", "in", "like", "is", "exists")
LIKE_OP = WHERE_OPS.index("like")
NO_AGG = 0  # AGG_OPS.index('none')


def _has_agg(unit) -> bool:
    return unit[0] != NO_AGG


def _count_agg(units) -> int:
    return len([unit for unit in units if _has_agg(unit)])


def _nested_sql(sql: dict) -> list[dict]:
    nested = []
    for cond_unit in sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]:
        if type(cond_unit[3]) is dict:
            nested.append(cond_unit[3])
        if type(cond_unit[4]) is dict:
            nested.append(cond_unit[4])
    for key in ("intersect", "except", "union"):
        if sql[key] is not None:
            nested.append(sql[key])
    return nested


def count_component1(sql: dict) -> int:
    """WHERE, GROUP BY, ORDER BY, LIMIT, each JOIN, each OR, each LIKE."""
    count = 0
    if len(sql["where"]) > 0:
        count += 1
    if len(sql["groupBy"]) > 0:
        count += 1
    if len(sql["orderBy"]) > 0:
        count += 1
    if sql["limit"] is not None:
        count += 1
    if len(sql["from"]["table_units"]) > 0:  # JOIN
        count += len(sql["from"]["table_units"]) - 1
    and_or = sql["from"]["conds"][1::2] + sql["where"][1::2] + sql["having"][1::2]
    count += len([token for token in and_or if token == "or"])
    cond_units = sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]
    count += len([cond_unit for cond_unit in cond_units if cond_unit[1] == LIKE_OP])
    return count


def count_component2(sql: dict) -> int:
    """Nested queries: subqueries in conditions, INTERSECT / EXCEPT / UNION."""
    return len(_nested_sql(sql))


def count_others(sql: dict) -> int:
    """More than one aggregate, select column, WHERE condition or GROUP BY column."""
    count = 0
    agg_count = _count_agg(sql["select"][1])
    agg_count += _count_agg(sql["where"][::2])
    agg_count += _count_agg(sql["groupBy"])
    if len(sql["orderBy"]) > 0:
        agg_count += _count_agg(
            [unit[1] for unit in sql["orderBy"][1] if unit[1]] + [unit[2] for unit in sql["orderBy"][1] if unit[2]]
        )
    agg_count += _count_agg(sql["having"])
    if agg_count > 1:
        count += 1
    if len(sql["select"][1]) > 1:
        count += 1
    if len(sql["where"]) > 1:
        count += 1
    if len(sql["groupBy"]) > 1:
        count += 1
    return count


def hardness(sql: dict) -> str:
    """Spider's level for one parsed query: 'easy', 'medium', 'hard' or 'extra'."""
    component1 = count_component1(sql)
    component2 = count_component2(sql)
    others = count_others(sql)
    if component1 <= 1 and others == 0 and component2 == 0:
        return "easy"
    if (others <= 2 and component1 <= 1 and component2 == 0) or (component1 <= 2 and others < 2 and component2 == 0):
        return "medium"
    if (
        (others > 2 and component1 <= 2 and component2 == 0)
        or (2 < component1 <= 3 and others <= 2 and component2 == 0)
        or (component1 <= 1 and others == 0 and component2 <= 1)
    ):
        return "hard"
    return "extra"
