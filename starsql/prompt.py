"""The one prompt template: training, evaluation and the app all build prompts here.

A code LM already knows SQL files, so the prompt is a SQL file: the schema, then the question as
a comment, then the answer. Earlier turns of a conversation are rendered the same way, so a
follow-up question ("now only the ones from 2023") sees the previous question and its SQL.
"""

import re
import sqlite3

from .schema import normalize_schema

PROMPT_TEMPLATE = "-- Database schema\n{schema}\n\n{history}-- Question: {question}\n-- SQL:\n"
TURN_TEMPLATE = "-- Question: {question}\n-- SQL:\n{sql}\n\n"


def _one_line(text: str) -> str:
    # A question spans one comment line; a newline inside it would end the comment.
    return " ".join(str(text).split())


def build_prompt(schema: str, question: str, history: list[tuple[str, str]] | None = None) -> str:
    """The prompt the model completes with SQL. `history` holds earlier (question, sql) turns."""
    turns = "".join(
        TURN_TEMPLATE.format(question=_one_line(q), sql=format_completion(s)) for q, s in history or []
    )
    return PROMPT_TEMPLATE.format(schema=normalize_schema(schema), history=turns, question=_one_line(question))


def fit_history(history: list[tuple[str, str]] | None, count_tokens, max_tokens: int) -> tuple[list[tuple[str, str]], int]:
    """The latest turns whose rendered text (TURN_TEMPLATE) takes at most `max_tokens` tokens
    together, in order, and how many older turns were dropped to fit. `count_tokens(text)` is the
    model's tokenizer. A turn far longer than the budget is not even tokenized."""
    kept, used = [], 0
    for question, sql in reversed(history or []):
        turn = TURN_TEMPLATE.format(question=_one_line(question), sql=format_completion(sql))
        cost = count_tokens(turn) if len(turn) <= 32 * max_tokens else max_tokens + 1
        if used + cost > max_tokens:
            break
        kept.append((question, sql))
        used += cost
    kept.reverse()
    return kept, len(history or []) - len(kept)


def format_completion(sql: str) -> str:
    """The training target: one statement ending in ';'. The trainer appends the tokenizer's EOS."""
    sql = " ".join(str(sql).split()).rstrip(";").strip()
    return sql + ";"


_FENCE = re.compile(r"```(?:sql)?\s*(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def extract_sql(generated: str) -> str:
    """The first SQL statement in what the model generated after the prompt.

    Models trained with this template stop at EOS; a base model runs on into the next
    `-- Question:`, so cut at the end of the first complete statement (sqlite3 knows where a
    statement ends, string literals included) or at the next comment line.
    """
    text = generated
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    kept = []
    for line in text.splitlines():
        if line.strip().startswith("--"):
            if kept:
                break
            continue
        kept.append(line)
    text = "\n".join(kept)
    end = first_statement_end(text)
    return (text if end is None else text[:end]).strip().rstrip(";").strip()


def first_statement_end(text: str) -> int | None:
    """Index just past the ';' that ends the first complete statement (string literals may hold
    ';', and sqlite3 knows where a statement really ends), or None while it is unfinished."""
    position = text.find(";")
    text = text.replace("\x00", " ")  # sqlite3 refuses NUL; a sampled answer may hold one
    while position != -1:
        if sqlite3.complete_statement(text[: position + 1]):
            return position + 1
        position = text.find(";", position + 1)
    return None
